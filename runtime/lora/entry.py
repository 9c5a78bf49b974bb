"""The ``"lora"`` entry of a layer's compute chain (runtime/models/layers.py, docs/ARCHITECTURE.md §3).

One ``LoraEntry`` per adapted Conv2d / Linear holds that layer's adapters (down, up, scaling) and
computes ``base(x) + sum_i scaling_i * up_i(down_i(x))`` for the active ones, as peft's LoRA layer
does, but batched: the active adapters' downs are concatenated along the rank and their ups too, with
each adapter's scaling folded into its up columns, so one low-rank pair of matmuls (convolutions)
serves every active adapter. The packed pair is cast to the input's dtype and device once and cached
per (dtype, device); any change of adapters, weights or activity rebuilds the packs, in place when
the shapes stay (hotswap with padded ranks: fixed-rank buffers, so compiled code sees the same
tensors and nothing recompiles).

On CPU (bf16 and fp32), Linears and 1x1 convolutions also keep the kernel's copy of the pair
(runtime/kernels/lora_cpu.py; each adapter's own rank, hotswap's padding left out), and the term runs in
that one-pass kernel where runtime/lora/term_kernel.py measured it faster for the call's shape (rows of
channels: a Linear's input, or a channels-last convolution's).

``base(x)`` is the rest of the chain (packed / Winograd kernels over the untouched base weights):
adapters run on the side and never repack the base. The entry has no ``same_operator``, but offers its
term alone (``add_term``): fused q/k/v keep their one matmul and add each projection's term after it
(``Linear.side_terms()``); the fused GEGLU kernel takes it as two factors (``low_rank``) inside its sums;
the upsample fold, which would need the term inside its kernel, falls back to the separate layers while
it is plugged (``computes_operator()``). While a layer has a fused adapter, its unfused adapters are not
applied (peft's rule: a merged layer runs its base layer only) and the entry is unplugged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.kernels import lora_cpu

from . import term_kernel

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
        self.kernel_packs: dict = {}  # (dtype, device) -> (kernel down, kernel up, down, up) | None: _kernel_pack

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

    def _kernel_pack(self, dtype: torch.dtype, device: torch.device):
        """The one-pass kernel's copy of the active adapters' pair (``lora_kernel_weights``), then the pair itself
        unpadded ((rank, k) and (n, rank), in ``dtype``), or None where the kernel does not take this layer.
        Only each adapter's own rank: hotswap's zero padding (a rank-8 file in a rank-64 slot) is left out, so
        it costs the kernel nothing; the kernel never runs in a compiled graph, so these need not be the same
        tensors after a swap (the matmuls' packs are)."""
        names = self.active_names()
        if (not names or dtype not in lora_cpu.SOURCES or device.type != "cpu" or not self._rows_kernel()
                or lora_cpu.cpu_lora_term_ready(dtype) is not None):
            return None
        with torch.no_grad():
            adapters = [self.adapters[n] for n in names]
            down = torch.cat([a.down[:a.rank].reshape(a.rank, -1) for a in adapters], dim=0)
            down = down.to(device=device, dtype=dtype)
            up = torch.cat([(a.up[:, :a.rank].reshape(a.up.shape[0], a.rank).to(torch.float32) * a.scaling)
                            for a in adapters], dim=1).to(device=device, dtype=dtype)
            return (*lora_cpu.lora_kernel_weights(down, up, dtype), down, up)

    def rebuild(self, layer: nn.Module | None = None) -> None:
        """Make every cached pack again (in place where the shapes allow); with ``layer``, also the
        pack for its weight's dtype and device, so a first call (a compiled one too) finds it ready."""
        for key in list(self.packs):
            self.packs[key] = self._pack(*key, previous=self.packs[key])
        for key in list(self.kernel_packs):
            self.kernel_packs[key] = self._kernel_pack(*key)
        if layer is not None and isinstance(getattr(layer, "weight", None), torch.Tensor):
            w = layer.weight
            key = (w.dtype, w.device)
            if key not in self.packs:
                self.packs[key] = self._pack(*key)

    def drop_packs(self) -> None:
        self.packs.clear()
        self.kernel_packs.clear()

    # ---- the chain entry -------------------------------------------------------------------
    @staticmethod
    def _made_once(cache: dict, x: torch.Tensor, make):
        """``cache``'s entry for ``x``'s (dtype, device), made by ``make(dtype, device)`` on first use."""
        key = (x.dtype, x.device)
        found = cache.get(key, _MISSING)
        if found is _MISSING:
            found = cache[key] = make(*key)
        return found

    def _pack_for(self, x: torch.Tensor):
        return self._made_once(self.packs, x, self._pack)

    def _kernel_pack_for(self, x: torch.Tensor):
        return self._made_once(self.kernel_packs, x, self._kernel_pack)

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if self.conv:
            stride, padding, dilation = self.geometry
            if x.ndim == 4 and tuple(down.shape[2:]) == (1, 1) and stride == (1, 1) and padding == (0, 0) and dilation == (1, 1):
                # a 1x1 convolution (proj_in / proj_out) to rank r as a matrix product: oneDNN's convolution
                # takes 2-3.5x as long at r = 8 (bench/RESULTS.md, 'LoRA: the 1x1 down products as matmuls')
                b, c, height, width = x.shape
                d2 = down.view(down.shape[0], c)
                if x.is_contiguous():
                    return torch.matmul(d2, x.view(b, c, -1)).view(b, -1, height, width)
                if x.is_contiguous(memory_format=torch.channels_last):
                    rows = x.permute(0, 2, 3, 1).reshape(-1, c) @ d2.t()
                    return rows.view(b, height, width, -1).permute(0, 3, 1, 2)
            return F.conv2d(x, down, None, stride, padding, dilation)
        return F.linear(x, down)

    def _fold(self, out: torch.Tensor, h: torch.Tensor, up: torch.Tensor, scale: float) -> bool:
        """``out += scale * up(h)`` in place as one matrix product into ``out`` (addmm / baddbmm: no
        term tensor, no second pass over ``out``); False where the layouts do not allow it."""
        if out.dtype != h.dtype or (torch.is_grad_enabled() and (out.requires_grad or h.requires_grad)):
            return False
        r = up.shape[1]
        try:
            if not self.conv:
                if out.shape[:-1] != h.shape[:-1]:
                    return False
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, r), up.t(), alpha=scale)
                return True
            if out.ndim != 4 or h.shape[0] != out.shape[0] or h.shape[2:] != out.shape[2:]:
                return False
            up2 = up.view(up.shape[0], r)
            # h has r channels: laying it out as ``out`` is (a copy where it is not) costs little
            if out.is_contiguous():
                b, c = out.shape[:2]
                out.view(b, c, -1).baddbmm_(up2.expand(b, c, r), h.reshape(b, r, -1), alpha=scale)
                return True
            if out.is_contiguous(memory_format=torch.channels_last):
                rows = out.permute(0, 2, 3, 1).view(-1, out.shape[1])
                rows.addmm_(h.permute(0, 2, 3, 1).reshape(-1, r), up2.t(), alpha=scale)
                return True
        except RuntimeError:  # a view the layout does not allow: the term is added the plain way
            return False
        return False

    def add_term(self, layer: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` (the layer's operator on ``x``, a fresh tensor) plus the active adapters' term (call-time
        scale applied): written into ``out`` where no autograd needs it, else a new tensor. What the entry
        adds to ``rest(x)``; fused q/k/v call it on their slices (``Linear.side_terms``)."""
        pack = self._pack_for(x)
        return out if pack is None else self._with_term(out, x, pack)

    def _rows_kernel(self) -> bool:
        """Whether the term is a product of rows the kernel can take: a Linear's, or a 1x1 convolution's on
        channels-last tensors (each pixel a row of channels)."""
        if not self.conv:
            return True
        a = next(iter(self.adapters.values()), None)
        return a is not None and tuple(a.down.shape[2:]) == (1, 1) and self.geometry == ((1, 1), (0, 0), (1, 1))

    def _kernel_term(self, out: torch.Tensor, x: torch.Tensor, pack, scale: float) -> bool:
        """``out += scale * term`` by the one-pass kernel where it was packed for and measured faster."""
        if self.conv:  # packed only for 1x1: rows of channels where both are channels-last
            if (x.ndim != 4 or out.ndim != 4 or x.shape[2:] == (1, 1) or x.is_contiguous()
                    or not x.is_contiguous(memory_format=torch.channels_last) or out.is_contiguous()
                    or not out.is_contiguous(memory_format=torch.channels_last)):
                return False
            x, out = x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)
        if (out.dtype != x.dtype or x.dtype not in lora_cpu.SOURCES or out.shape[:-1] != x.shape[:-1]
                or (torch.is_grad_enabled() and (out.requires_grad or x.requires_grad))
                or torch.compiler.is_compiling()):
            return False
        kernel = self._kernel_pack_for(x)
        ldx, ldo = lora_cpu.row_stride(x), lora_cpu.row_stride(out)
        k = x.shape[-1]
        if (kernel is None or ldx is None or ldo is None
                or not term_kernel.use_kernel(x.numel() // k if k else 0, k, kernel[0].shape[0], out.shape[-1],
                                              x.dtype)):
            return False
        lora_cpu.lora_term_launch(out, x, kernel[0], kernel[1], scale, ldx, ldo)
        return True

    def low_rank(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The active adapters' term on ``x`` as two factors, ``h @ up.T``: ``h`` the down product (rows of
        ``x``, the call-time scale applied), ``up`` (outputs, rank) with the scalings folded, both in ``x``'s
        dtype; None when nothing is active. For a kernel that adds the term inside its own sums (the fused
        GEGLU projection: runtime/optim/geglu.py); Linears only."""
        if self.conv:
            return None
        pack = self._pack_for(x)
        if pack is None:
            return None
        live = self._kernel_pack_for(x)  # without hotswap's padding where there is one
        down, up = pack if live is None else live[2:]
        h = F.linear(x, down)
        scale = self.state.call_scale()
        return (h if scale == 1.0 else h.mul_(scale)), up

    def _with_term(self, out: torch.Tensor, x: torch.Tensor, pack) -> torch.Tensor:
        down, up = pack
        scale = self.state.call_scale()
        if self._kernel_term(out, x, pack, scale):
            return out
        h = self._down(x, down)
        if self._fold(out, h, up, scale):
            return out
        delta = F.conv2d(h, up) if self.conv else F.linear(h, up)
        if scale != 1.0:
            delta = delta * scale
        if out.requires_grad or delta.requires_grad or out.shape != delta.shape or out.dtype != delta.dtype:
            return out + delta  # peft's order: base(x) + lora
        return out.add_(delta)

    def __call__(self, layer: nn.Module, x: torch.Tensor, rest, add: torch.Tensor | None = None) -> torch.Tensor:
        pack = self._pack_for(x)
        if pack is None:
            return rest(x, add)
        out = self._with_term(rest(x), x, pack)
        if add is None:
            return out
        # then a caller's residual (add + out == out + add); into ``out`` where it is ours alone
        if out.requires_grad or add.requires_grad or add.shape != out.shape or add.dtype != out.dtype:
            return add + out
        return out.add_(add)

    def __repr__(self) -> str:
        return f"LoraEntry({self.path!r}, adapters={list(self.adapters)}, fused={[n for n, _ in self.fused]})"
