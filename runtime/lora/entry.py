"""The ``"lora"`` entry of a layer's compute chain (runtime/models/layers.py, docs/ARCHITECTURE.md §3).

One ``LoraEntry`` per adapted Conv2d / Linear holds that layer's adapters (down, up, scaling) and
computes ``base(x) + sum_i scaling_i * up_i(down_i(x))`` for the active ones, as peft's LoRA layer
does, but batched: the active adapters' downs are concatenated along the rank and their ups too, with
each adapter's scaling folded into its up columns, so one low-rank pair of matmuls (convolutions)
serves every active adapter. The packed pair is cast to the input's dtype and device once and cached
per (dtype, device); any change of adapters, weights or activity rebuilds the packs, in place when
the shapes stay (hotswap with padded ranks: fixed-rank buffers, so compiled code sees the same
tensors and nothing recompiles).

``base(x)`` is the rest of the chain (packed / Winograd kernels over the untouched base weights):
adapters run on the side and never repack the base. The entry has no ``same_operator``, but offers its
term alone (``delta``): fused q/k/v keep their one matmul and add each projection's term after it
(``Linear.side_terms()``); fused GEGLU and the upsample fold, which would need the term inside their
kernels, fall back to the separate layers while it is plugged (``computes_operator()``). While a layer has a fused adapter, its unfused adapters are not applied
(peft's rule: a merged layer runs its base layer only) and the entry is unplugged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_MISSING = object()


@dataclass
class AdapterWeights:
    """One adapter on one layer. ``down``/``up`` are what the packs read (padded to the hotswap rank
    when there is one); ``source_down``/``source_up`` the tensors as loaded (what a save writes)."""

    down: torch.Tensor
    up: torch.Tensor
    source_down: torch.Tensor
    source_up: torch.Tensor
    rank: int
    alpha: float
    scaling: float  # peft's ``scaling``: weight * alpha / rank (times fuse_lora's lora_scale)
    padded: bool = False  # down/up are our fixed-rank buffers (enable_lora_hotswap), updated in place

    @property
    def base_scale(self) -> float:
        return self.alpha / self.rank


def padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """``tensor`` with dimension ``dim`` (the rank) zero-padded to ``rank``: a new buffer we own."""
    shape = list(tensor.shape)
    shape[dim] = rank
    out = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


class LoraEntry:
    """``impl(layer, x, rest, add)`` of one adapted layer; see the module docstring."""

    def __init__(self, state, path: str, layer: nn.Module):
        self.state = state  # the model's LoraState: active names, enabled, call-time scale
        self.path = path
        self.conv = isinstance(layer, nn.Conv2d)
        self.geometry = (tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)) if self.conv else None
        self.adapters: dict[str, AdapterWeights] = {}
        self.fused: list[tuple[str, float]] = []  # (adapter, scaling it was fused with), in fuse order
        self.originals: dict = {}  # fuse.py: storage key -> (copy, its saved original)
        self.packs: dict = {}  # (dtype, device) -> (down, up) | None

    # ---- what is applied -------------------------------------------------------------------
    def active_names(self) -> list[str]:
        """Adapters this layer adds on the side now (none while one is fused here, or LoRA is disabled)."""
        if self.fused or not self.state.enabled:
            return []
        return [n for n in self.state.active if n in self.adapters]

    def wants_plug(self) -> bool:
        """Whether the entry belongs in the chain: it adds something, or (hotswap mode) it may soon."""
        if self.fused or not self.adapters:
            return False
        return bool(self.active_names()) or self.state.target_rank is not None

    def _pack(self, dtype: torch.dtype, device: torch.device, previous=None):
        names = self.active_names()
        if not names:
            return None
        with torch.no_grad():
            adapters = [self.adapters[n] for n in names]
            down = torch.cat([a.down.to(device=device, dtype=dtype) for a in adapters], dim=0)
            up = torch.cat([(a.up.to(device=device, dtype=torch.float32) * a.scaling).to(dtype) for a in adapters],
                           dim=1)
            if (previous is not None and previous[0].shape == down.shape and previous[1].shape == up.shape
                    and not previous[0].is_inference()):
                previous[0].copy_(down)
                previous[1].copy_(up)
                return previous
        return down, up

    def rebuild(self, layer: nn.Module | None = None) -> None:
        """Make every cached pack again (in place where the shapes allow); with ``layer``, also the
        pack for its weight's dtype and device, so a first call (a compiled one too) finds it ready."""
        for key in list(self.packs):
            self.packs[key] = self._pack(*key, previous=self.packs[key])
        if layer is not None and isinstance(getattr(layer, "weight", None), torch.Tensor):
            w = layer.weight
            key = (w.dtype, w.device)
            if key not in self.packs:
                self.packs[key] = self._pack(*key)

    def drop_packs(self) -> None:
        self.packs.clear()

    # ---- the chain entry -------------------------------------------------------------------
    def delta(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The active adapters' term for ``x`` (call-time scale applied), or None when none is active:
        what the entry adds to ``rest(x)`` (``Linear.side_terms``: fused q/k/v add it after their matmul)."""
        key = (x.dtype, x.device)
        pack = self.packs.get(key, _MISSING)
        if pack is _MISSING:
            pack = self.packs[key] = self._pack(*key)
        if pack is None:
            return None
        down, up = pack
        if self.conv:
            stride, padding, dilation = self.geometry
            delta = F.conv2d(F.conv2d(x, down, None, stride, padding, dilation), up)
        else:
            delta = F.linear(F.linear(x, down), up)
        scale = self.state.call_scale()
        return delta if scale == 1.0 else delta * scale

    def __call__(self, layer: nn.Module, x: torch.Tensor, rest, add: torch.Tensor | None = None) -> torch.Tensor:
        delta = self.delta(layer, x)
        if delta is None:
            return rest(x, add)
        out = rest(x)
        if (out.requires_grad or delta.requires_grad or out.shape != delta.shape or out.dtype != delta.dtype
                or (add is not None and (add.shape != out.shape or add.dtype != out.dtype))):
            out = out + delta  # peft's order: base(x) + lora; then a caller's residual
            return out if add is None else add + out
        # no autograd: the base output is ours alone (a fresh tensor), so add into it (a + b == b + a)
        out.add_(delta)
        return out if add is None else out.add_(add)

    def __repr__(self) -> str:
        return f"LoraEntry({self.path!r}, adapters={list(self.adapters)}, fused={[n for n, _ in self.fused]})"
