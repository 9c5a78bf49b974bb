"""Convolution and linear weights packed once for oneDNN on CPU (level 2, near-exact with precision).

Eager ``F.conv2d`` on CPU hands oneDNN plain NCHW weights, and oneDNN reorders them into its
blocked layout on every call: at the UNet's deep, small-spatial layers that reorder costs as
much as the convolution (512 channels at 8x8; measured: bench/RESULTS.md, session 12, 'Our bf16 CPU
attention kernel and packed convolution weights', prepack). Eager ``F.linear`` with a bias in bf16
first copies the broadcast bias into its output, then multiplies (a (2048, 1024) copy took a sizeable
share of the matmul's time; measured: bench/RESULTS.md, session 12, 'Level 2 without compile: packed
linears, fused GEGLU, compile skipped for bf16 on CPU'). This pass gives each bf16
``nn.Conv2d`` and ``nn.Linear`` of the pipeline's models (fp32 ones too with ``fp32=True``;
measured no faster) a forward that packs its weight once (convolutions: per input shape, at most
``MAX_SHAPES`` of them, the oldest dropped) and calls oneDNN's convolution / linear with the packed
weight, the bias added inside.

The packed copy follows the weight: it is rebuilt when the weight's storage, version or dtype
changes (precision switching dtypes, a user loading new weights with ``load_state_dict``), so it
is never stale; edits through ``weight.data``, and in-place edits of weights made inside
``torch.inference_mode`` (which have no version counter), are not seen: re-optimize after them.
Costs memory: one packed copy of every weight it packs; a weight that precision left on file pages
hands its own pages back once packed (``served``, runtime/optim/derived.py). Under torch.compile, or when autograd
needs the graph, the plain operator runs (inductor packs weights itself when it freezes). Revert
deletes the per-instance forward: the module is what it was.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.layers import Conv2d, Linear

from .base import Pass
from .components import pipeline_device, pipeline_models
from .derived import derived, served, weight_cache  # noqa: F401  (weight_cache: the earlier name of the rule)
from .undo import entry

PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Packed copies a convolution keeps, one per input shape (oneDNN picks the layout for the shape): a
# pipeline called at many sizes (or batch sizes) would otherwise keep one more weight copy per size.
# Past this many the oldest goes; four covers a pipeline's usual one or two shapes per layer.
MAX_SHAPES = 4


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 convolutions and linears on this CPU (torch's own check: AVX-512 BW, VL and
    DQ, or AVX-NE-CONVERT). Where it does not (AVX2-only CPUs), packing a bf16 weight raises, so bf16
    weights stay on the plain operator there. The host's answer, never a faked one: it decides what can run."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else torch.cpu._is_avx512_supported()
    except RuntimeError:
        return False


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this call must take the plain operator (compiling, autograd, odd inputs, bf16 where
    oneDNN has no bf16 path)."""
    return (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != w.dtype
            or w.dtype not in PACKED_DTYPES or x.numel() == 0
            or (w.dtype == torch.bfloat16 and not onednn_bf16())
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def _drop_oldest(cache: dict) -> None:
    """Drop the packed copy made first (dicts keep insertion order); another thread may have dropped it already."""
    try:
        del cache[next(k for k in list(cache) if k != "owner")]
    except (KeyError, StopIteration):
        pass


class PackedConv:
    """The ``prepack`` entry of a convolution's compute chain: its oneDNN-packed weight per input shape."""

    same_operator = True  # the layer's own convolution, another way (runtime/models/layers.py)

    def __init__(self, conv: nn.Conv2d):
        self.packed_cache: dict = {}
        self.geometry = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups

    def __call__(self, conv: nn.Conv2d, x: torch.Tensor, rest, add=None) -> torch.Tensor:
        w = conv.weight
        if _plain(x, w) or x.ndim != 4:
            return rest(x, add)
        padding, stride, dilation, groups = self.geometry
        key = tuple(x.shape)
        cache = derived(self.packed_cache, w)
        packed = cache.get(key)
        if packed is None:
            if len(cache) > MAX_SHAPES:  # the "owner" entry and MAX_SHAPES packed copies
                _drop_oldest(cache)
            packed = cache[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), padding, stride, dilation, groups, list(x.shape))
            served(w)
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, padding, stride, dilation, groups,
                                                      "none", [], "")
        return out if add is None else add + out


class PackedLinear:
    """The ``prepack`` entry of a linear's compute chain: its oneDNN-packed weight (valid for any row count)."""

    same_operator = True

    def __init__(self, linear: nn.Linear):
        self.packed_cache: dict = {}

    def __call__(self, linear: nn.Linear, x: torch.Tensor, rest, add=None) -> torch.Tensor:
        w = linear.weight
        if _plain(x, w):
            return rest(x, add)
        packed = derived(self.packed_cache, w).get("packed")
        if packed is None:  # the row count only hints oneDNN's choice of layout
            packed = self.packed_cache["packed"] = torch.ops.mkldnn._reorder_linear_weight(
                w.detach(), x.numel() // x.shape[-1])
            served(w)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")
        return out if add is None else add + out


def _standalone(module: nn.Module, impl):
    """``impl`` as a forward of ``module`` outside a compute chain (its plain operator as the rest)."""
    if isinstance(module, nn.Conv2d):
        def plain(x, add=None):
            out = module._conv_forward(x, module.weight, module.bias)
            return out if add is None else add + out
    else:
        def plain(x, add=None):
            out = F.linear(x, module.weight, module.bias)
            return out if add is None else add + out

    def forward(x: torch.Tensor) -> torch.Tensor:
        return impl(module, x, plain, None)

    forward.packed_cache = impl.packed_cache
    return forward


def packed_conv_forward(conv: nn.Conv2d):
    """A forward for any ``nn.Conv2d`` that keeps its oneDNN-packed weight per input shape."""
    return _standalone(conv, PackedConv(conv))


def packed_linear_forward(linear: nn.Linear):
    """A forward for any ``nn.Linear`` that keeps its oneDNN-packed weight (valid for any row count)."""
    return _standalone(linear, PackedLinear(linear))


def mkldnn_usable() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    missing = [op for op in ("_convolution_pointwise", "_linear_pointwise", "_reorder_linear_weight")
               if not hasattr(torch.ops.mkldnn, op)]
    if missing:
        return f"this torch build lacks mkldnn.{', mkldnn.'.join(missing)}"
    return None


def _packer(module: nn.Module):
    """The chain entry maker for ``module``, or None when it is not one this pass packs."""
    if entry(module, "prepack") is not None:
        return None
    if isinstance(module, Conv2d):
        return PackedConv if module.padding_mode == "zeros" and not isinstance(module.padding, str) else None
    if isinstance(module, Linear):
        return PackedLinear
    return None


@dataclass(frozen=True)
class PrepackPass(Pass):
    name = "prepack"
    exact = True
    # fp32 weights too: measured no faster packed on this CPU (end to end on small: bench/RESULTS.md,
    # session 12, 'Our bf16 CPU attention kernel and packed convolution weights', ours-conv_prepack), so by
    # default only bf16 ones (after precision) are packed and fp32 weights are not duplicated.
    fp32: bool = False

    def _targets(self, pipe):
        dtypes = PACKED_DTYPES if self.fp32 else (torch.bfloat16,)
        if not onednn_bf16():
            dtypes = tuple(d for d in dtypes if d != torch.bfloat16)
        return [(m, packer) for model in pipeline_models(pipe).values() for m in model.modules()
                if (packer := _packer(m)) is not None and m.weight.dtype in dtypes]

    def supports(self, pipe) -> str | None:
        if pipeline_device(pipe).type != "cpu":
            return f"packing for oneDNN is a CPU path; this pipeline is on {pipeline_device(pipe)}"
        why = mkldnn_usable()
        if why:
            return why
        if not self._targets(pipe):
            if not onednn_bf16() and not self.fp32:
                return ("oneDNN has no bf16 path on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT), and "
                        "fp32 packing measured no faster (fp32=True forces it)")
            kinds = ("bf16 or fp32" if self.fp32
                     else "bf16 (precision off?; fp32 packing measured no faster, fp32=True forces it)")
            return f"no {kinds} convolutions or linears in this pipeline"
        return None

    def apply(self, pipe) -> None:
        patched = self._state().setdefault("patched", [])
        for module, packer in self._targets(pipe):
            self.log().plug(module, "prepack", packer(module))
            patched.append(module)

    def describe(self) -> str:
        patched = self._state().get("patched", [])
        convs = sum(isinstance(m, nn.Conv2d) for m in patched)
        return f"{convs} convolutions and {len(patched) - convs} linears packed for oneDNN"
