"""Nearest-neighbour doubling folded into the 3x3 conv that follows it (level 1, exact class).

An ``Upsample2D`` doubles its input (each pixel becomes a 2x2 block), then runs a 3x3 conv over
the doubled map. Each of the four output phases (even/odd row, even/odd column) reads only a 2x2
window of the *small* input, through a 2x2 kernel whose taps are sums of the 3x3 kernel's taps:
for an even output row the window's upper row carries kernel row 0 and its lower row rows 1 + 2;
for an odd one, rows 0 + 1 and row 2 (columns alike). So one 2x2 conv with four times the output
channels over the small input (padded by one) computes all four phases, and one copy interleaves
them: 16 multiply-adds per input pixel and channel pair instead of 36, no doubled input in memory.
Measured faster than upsample-then-conv in fp32 and in bf16 at the UNets' and VAEs' shapes
(bench/RESULTS.md, session 13, 'TGATE drops guidance after its gate', upsampling folded into the
conv; the ranges first written here: 'Figures moved from docstrings'); the fp32 result differs by rounding only (sums taken in another order).

The folded weights follow the conv's weight (rebuilt when its storage, version or dtype changes,
as ``prepack`` does); bf16 and fp32 calls on CPU go to oneDNN with them packed. Plugs into
``Upsample2D.conv_2x`` (docs/ARCHITECTURE.md §3); calls with an explicit output size (odd latent sizes) take
the eager path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.resnet import Upsample2D

from . import derived_store
from .base import Pass
from .components import pipeline_models
from .derived import derived, served
from .prepack import mkldnn_usable, packed_conv_forward

# FOLD[a] (2 x 3): which 3x3 kernel rows (columns) feed the two window rows (columns) of phase a.
FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (4 O, C, 2, 2): the kernels of phases (0, 0), (0, 1), (1, 0), (1, 1), summed in fp32."""
    w = weight.detach().float()
    fold = FOLD.to(w.device)
    phases = [torch.einsum("tk,ockl,sl->octs", fold[a], w, fold[b]) for a in (0, 1) for b in (0, 1)]
    return torch.cat(phases).to(weight.dtype)


def interleave_phases(g: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(N, 4 O, H + 1, W + 1) phase maps -> (N, O, 2H, 2W): phase (a, b) at (i, j) is ``g[.., i + a, j + b]``."""
    n, _, h1, w1 = g.shape
    h, w = h1 - 1, w1 - 1
    fmt = torch.channels_last if g.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((n, out_channels, 2 * h, 2 * w), dtype=g.dtype, device=g.device, memory_format=fmt)
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = g[:, k * out_channels:(k + 1) * out_channels, a:a + h, b:b + w]
    return out


class FoldedUpsampleConv:
    """The ``conv_2x`` of one Upsample2D: its conv's folded 2x2 weights, kept fresh."""

    def __init__(self, module: Upsample2D):
        conv = module.conv
        self.shape = conv.in_channels, 4 * conv.out_channels, conv.bias is not None
        self.onednn = mkldnn_usable() is None
        self.release()

    def release(self) -> None:
        """Drop the folded weights and their packed copy (made again on the next call): for a pass that
        measured this fold against another way and chose that (runtime/optim/winograd.py)."""
        cin, cout, bias = self.shape
        self.folded = nn.Conv2d(cin, cout, 2, padding=1, bias=bias, device="meta")
        self.cache: dict = {}  # emptied by weight_cache when the conv weight changes
        self.packed = packed_conv_forward(self.folded)

    def _refresh(self, conv: nn.Conv2d) -> None:
        cache = derived(self.cache, conv.weight)
        if "folded" not in cache:
            with torch.no_grad():
                folded = derived_store.cached(conv.weight, "upsample-fold", lambda: fold_weight(conv.weight), fold_weight)
                self.folded.weight = nn.Parameter(folded, requires_grad=False)
                if conv.bias is not None:
                    self.folded.bias = nn.Parameter(conv.bias.detach().repeat(4), requires_grad=False)
            cache["folded"] = True
            served(conv.weight)

    def __call__(self, module: Upsample2D, x: torch.Tensor) -> torch.Tensor:
        conv = module.conv
        if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and conv.weight.requires_grad)
                or not conv.computes_operator()):
            # traced (inductor fuses on its own), training (gradients), or the conv's chain computes more
            # than its weight (an adapter's term): the eager ops, through the conv's own call
            return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        self._refresh(conv)
        # packed once for oneDNN, fp32 too: unpacked, SD 1.5's fp32 folds (up to 105 MB of weights at 4x4
        # pixels) spent most of each call reordering them (measured: bench/RESULTS.md, session 15, "The
        # upsample pass's fp32 folds, packed")
        fast = self.onednn and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
        g = self.packed(x) if fast else self.folded(x)
        return interleave_phases(g, conv.out_channels)


def plain_3x3(conv) -> bool:
    """A 3x3, stride-1, padding-1, undilated, ungrouped, zero-padded ``nn.Conv2d``."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def foldable(module: nn.Module) -> bool:
    """An Upsample2D whose conv is a plain 3x3 one."""
    return isinstance(module, Upsample2D) and plain_3x3(module.conv)


@dataclass(frozen=True)
class UpsamplePass(Pass):
    name = "upsample"
    exact = True

    def _modules(self, pipe):
        return [m for model in pipeline_models(pipe).values() for m in model.modules() if foldable(m)]

    def supports(self, pipe) -> str | None:
        if not self._modules(pipe):
            return "no nearest-upsample-then-3x3-conv samplers in this pipeline"
        return None

    def apply(self, pipe) -> None:
        saved = self._state().setdefault("previous", [])
        for module in self._modules(pipe):
            self.log().set(module, "conv_2x", FoldedUpsampleConv(module))
            saved.append(module)

    def describe(self) -> str:
        return f"{len(self._state().get('previous', []))} upsamplers folded into their convs"
