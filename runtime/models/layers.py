"""Convolution and linear layers with a compute slot (docs/ARCHITECTURE.md §3).

``Conv2d`` and ``Linear`` are ``nn.Conv2d`` / ``nn.Linear`` with the same parameters, names and
arguments (checkpoints load unchanged, ``isinstance`` checks still hold), one optional input and
one extension point:

- ``forward(x, add=None)``: with ``add``, the layer returns ``add + op(x)`` (a residual a caller
  adds to the output; ``add + op(x)`` equals ``op(x) + add`` bit for bit), so an implementation
  can add it inside its kernel instead of in a second pass over the output.
- ``compute``: a tuple of ``(name, implementation)`` pairs, outermost first. Empty (the default),
  ``forward`` is exactly torch's: ``F.conv2d`` through ``nn.Conv2d._conv_forward``, and
  ``F.linear``. Otherwise the first implementation is called as ``impl(layer, x, rest, add)`` and
  must return what the layer computes for ``x`` (plus ``add`` when it is not None); ``rest(x,
  add=None)`` runs the remaining entries and, last, the plain operator, so an implementation hands
  on the calls (or the add) it does not take.

An implementation that computes the layer's own operator another way (a packed weight, a Winograd
transform) says so with a true ``same_operator`` attribute; one that changes what the layer
computes (an adapter's low-rank term) does not. ``computes_operator()`` is true when every entry
is of the first kind: only then may a caller compute the layer's result without calling it (one
matmul for several projections, a projection fused with its activation). An entry that only adds
a term to the operator's output (``rest(x) + term``) may also offer it alone as ``add_term(layer, out,
x)`` (``out`` plus the term, written into ``out`` where it may); ``side_terms()`` gives those when
every entry is of one of the two kinds, so a caller that computes the operator itself (fused q/k/v)
adds them after.

The layers know nothing about what the implementations do or in which order they belong: the
optimization layer decides the order (runtime/optim/undo.py, ``ORDER``) and sets the whole tuple.
Assigning ``()`` leaves the instance as constructed (no attribute of its own).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Rest = Callable[..., torch.Tensor]  # rest(x, add=None)
ComputeImpl = Callable[[nn.Module, torch.Tensor, Rest, Optional[torch.Tensor]], torch.Tensor]


class _Link:
    """One entry of a chain bound to its layer and to the rest of the chain."""

    __slots__ = ("impl", "layer", "rest")

    def __init__(self, impl: ComputeImpl, layer: nn.Module, rest: Rest):
        self.impl, self.layer, self.rest = impl, layer, rest

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        return self.impl(self.layer, x, self.rest, add)


class _ComputeSlot:
    """The ``compute`` slot shared by the layers below: stored as the tuple and its bound chain."""

    _chain = None  # the bound chain; None: the plain operator

    @property
    def compute(self) -> tuple[tuple[str, ComputeImpl], ...]:
        return self.__dict__.get("_compute", ())

    @compute.setter
    def compute(self, chain) -> None:
        chain = tuple(chain)
        if not chain:
            self.__dict__.pop("_compute", None)
            self.__dict__.pop("_chain", None)
            return
        call = self._plain
        for _, impl in reversed(chain):
            call = _Link(impl, self, call)
        self.__dict__["_compute"] = chain
        self.__dict__["_chain"] = call

    def computes_operator(self) -> bool:
        """Whether the chain computes exactly the layer's operator (empty, or only ``same_operator`` entries)."""
        return all(getattr(impl, "same_operator", False) for _, impl in self.__dict__.get("_compute", ()))

    def side_terms(self) -> list | None:
        """The terms the chain adds to the operator's output, as ``[add_term, ...]`` (each called as
        ``add_term(layer, out, x)``, in chain order), or None when some entry changes the operator otherwise."""
        terms = []
        for _, impl in self.__dict__.get("_compute", ()):
            if getattr(impl, "same_operator", False):
                continue
            add_term = getattr(impl, "add_term", None)
            if add_term is None:
                return None
            terms.append(add_term)
        return terms

    def low_rank_terms(self, x: torch.Tensor) -> list | None:
        """The terms the chain adds to the operator's output on ``x``, each as two factors ``(h, up)``, the term
        being ``h @ up.T`` (entries offering ``low_rank(layer, x)``, which gives None when it adds nothing now),
        for a kernel that adds them inside its own sums; None when some entry changes the operator otherwise
        or offers no factors."""
        factors = []
        for _, impl in self.__dict__.get("_compute", ()):
            if getattr(impl, "same_operator", False):
                continue
            low_rank = getattr(impl, "low_rank", None)
            if low_rank is None:
                return None
            got = low_rank(self, x)
            if got is not None:
                factors.append(got)
        return factors

    def add_side_terms(self, out: torch.Tensor, x: torch.Tensor, terms: list) -> torch.Tensor:
        """``out`` (this layer's operator on ``x``, computed by a caller, its own tensor or a slice of one)
        plus ``terms`` (``side_terms()``)."""
        for add_term in terms:
            out = add_term(self, out, x)
        return out


class Conv2d(_ComputeSlot, nn.Conv2d):
    """``nn.Conv2d`` with a ``compute`` slot and an ``add`` input (see the module docstring)."""

    def _plain(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        return out if add is None else add + out

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self._chain is None:
            out = self._conv_forward(x, self.weight, self.bias)
            return out if add is None else add + out
        return self._chain(x, add)


class Linear(_ComputeSlot, nn.Linear):
    """``nn.Linear`` with a ``compute`` slot and an ``add`` input (see the module docstring)."""

    def _plain(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out if add is None else add + out

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self._chain is None:
            out = F.linear(x, self.weight, self.bias)
            return out if add is None else add + out
        return self._chain(x, add)


@torch.no_grad()
def concatenated_linear(parts) -> Linear:
    """One ``Linear`` computing ``parts`` side by side (their weights and biases concatenated by output), no
    gradients. Made on the meta device and given the concatenated tensors: no random initialisation to throw
    away (a quarter of a second of SD 1.5's optimize) and no second copy."""
    weight = torch.cat([p.weight for p in parts], dim=0)
    fused = Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts], dim=0), requires_grad=False)
    return fused


def fused_outputs(fused: nn.Module, parts, x: torch.Tensor):
    """What each of ``parts`` (Linears of equal width on the same input ``x``) computes, through one
    matmul: ``fused`` (their weights concatenated), then each part's side terms on its slice. None
    when some part's chain changes its operator other than by adding a term: the caller runs the parts."""
    terms = [p.side_terms() for p in parts]
    if any(t is None for t in terms):
        return None
    outs = fused(x).chunk(len(parts), dim=-1)
    if not any(terms):
        return outs
    return tuple(p.add_side_terms(o, x, t) if t else o for p, o, t in zip(parts, outs, terms))
