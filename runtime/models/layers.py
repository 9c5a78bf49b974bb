"""Convolution and linear layers with a compute slot (docs/ARCHITECTURE.md §3).

``Conv2d`` and ``Linear`` are ``nn.Conv2d`` / ``nn.Linear`` with the same parameters, names and
arguments (checkpoints load unchanged, ``isinstance`` checks still hold), and one extension
point: ``compute``, a tuple of ``(name, implementation)`` pairs, outermost first. Empty (the
default), ``forward`` is exactly torch's: ``F.conv2d`` through ``nn.Conv2d._conv_forward``, and
``F.linear``. Otherwise the first implementation is called as ``impl(layer, x, rest)`` and must
return what the layer computes for ``x``; ``rest(x)`` runs the remaining entries and, last, the
plain operator, so an implementation hands on the calls it does not take.

The layers know nothing about what the implementations do or in which order they belong: the
optimization layer decides the order (runtime/optim/undo.py, ``ORDER``) and sets the whole tuple.
Assigning ``()`` leaves the instance as constructed (no attribute of its own).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ComputeImpl = Callable[[nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


class _Link:
    """One entry of a chain bound to its layer and to the rest of the chain."""

    __slots__ = ("impl", "layer", "rest")

    def __init__(self, impl: ComputeImpl, layer: nn.Module, rest: Callable[[torch.Tensor], torch.Tensor]):
        self.impl, self.layer, self.rest = impl, layer, rest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(self.layer, x, self.rest)


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


class Conv2d(_ComputeSlot, nn.Conv2d):
    """``nn.Conv2d`` with a ``compute`` slot (see the module docstring)."""

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._chain is None:
            return self._conv_forward(x, self.weight, self.bias)
        return self._chain(x)


class Linear(_ComputeSlot, nn.Linear):
    """``nn.Linear`` with a ``compute`` slot (see the module docstring)."""

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._chain is None:
            return F.linear(x, self.weight, self.bias)
        return self._chain(x)
