"""Convolution and linear weights packed once for oneDNN on CPU (level 2, near-exact with precision).

Eager ``F.conv2d`` on CPU hands oneDNN plain NCHW weights, and oneDNN reorders them into its
blocked layout on every call: at the UNet's deep, small-spatial layers that reorder costs as
much as the convolution (512 channels at 8x8: 2.1 ms eager against 1.4 ms packed). Eager
``F.linear`` with a bias in bf16 first copies the broadcast bias into its output, then multiplies
(a (2048, 1024) copy took as long as a third of the matmul). This pass gives each bf16
``nn.Conv2d`` and ``nn.Linear`` of the pipeline's models (fp32 ones too with ``fp32=True``;
measured no faster) a forward that packs its weight once (convolutions: per input shape) and calls
oneDNN's convolution / linear with the packed weight, the bias added inside.

The packed copy follows the weight: it is rebuilt when the weight's storage, version or dtype
changes (precision switching dtypes, a user loading new weights with ``load_state_dict``), so it
is never stale; edits through ``weight.data``, and in-place edits of weights made inside
``torch.inference_mode`` (which have no version counter), are not seen: re-optimize after them.
Costs memory: one packed copy of every weight it packs. Under torch.compile, or when autograd
needs the graph, the plain operator runs (inductor packs weights itself when it freezes). Revert
deletes the per-instance forward: the module is what it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Pass
from .components import pipeline_device, pipeline_models

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this call must take the plain operator (compiling, autograd, odd inputs)."""
    return (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != w.dtype
            or w.dtype not in PACKED_DTYPES or x.numel() == 0
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def weight_cache(cache: dict, w: torch.Tensor) -> dict:
    """``cache``, emptied when the weight is not the one its entries were packed from."""
    # inference tensors (weights converted inside inference_mode) have no version counter
    owner = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype)
    if cache.get("owner") != owner:
        cache.clear()
        cache["owner"] = owner
    return cache


def packed_conv_forward(conv: nn.Conv2d):
    """A forward for ``conv`` that keeps its oneDNN-packed weight per input shape."""
    cache: dict = {}
    padding, stride, dilation, groups = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        if _plain(x, w) or x.ndim != 4:
            return conv._conv_forward(x, w, conv.bias)
        key = tuple(x.shape)
        packed = weight_cache(cache, w).get(key)
        if packed is None:
            packed = cache[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), padding, stride, dilation, groups, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, padding, stride, dilation, groups,
                                                       "none", [], "")

    forward.packed_cache = cache
    return forward


def packed_linear_forward(linear: nn.Linear):
    """A forward for ``linear`` that keeps its oneDNN-packed weight (valid for any row count)."""
    cache: dict = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = linear.weight
        if _plain(x, w):
            return F.linear(x, w, linear.bias)
        packed = weight_cache(cache, w).get("packed")
        if packed is None:  # the row count only hints oneDNN's choice of layout
            packed = cache["packed"] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), x.numel() // x.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")

    forward.packed_cache = cache
    return forward


def mkldnn_usable() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    missing = [op for op in ("_convolution_pointwise", "_linear_pointwise", "_reorder_linear_weight")
               if not hasattr(torch.ops.mkldnn, op)]
    if missing:
        return f"this torch build lacks mkldnn.{', mkldnn.'.join(missing)}"
    return None


def _packer(module: nn.Module):
    """The packed forward maker for ``module``, or None when it is not one this pass packs."""
    if isinstance(module, nn.Conv2d):
        return packed_conv_forward if module.padding_mode == "zeros" and not isinstance(module.padding, str) else None
    if isinstance(module, nn.Linear):
        return packed_linear_forward
    return None


@dataclass(frozen=True)
class PrepackPass(Pass):
    name = "prepack"
    exact = True
    # fp32 weights too: measured no faster packed on this CPU (0.98x end to end on small), so by
    # default only bf16 ones (after precision) are packed and fp32 weights are not duplicated.
    fp32: bool = False

    def _targets(self, pipe):
        dtypes = PACKED_DTYPES if self.fp32 else (torch.bfloat16,)
        return [(m, packer) for model in pipeline_models(pipe).values() for m in model.modules()
                if (packer := _packer(m)) is not None and "forward" not in m.__dict__ and m.weight.dtype in dtypes]

    def supports(self, pipe) -> str | None:
        if pipeline_device(pipe).type != "cpu":
            return f"packing for oneDNN is a CPU path; this pipeline is on {pipeline_device(pipe)}"
        why = mkldnn_usable()
        if why:
            return why
        if not self._targets(pipe):
            kinds = ("bf16 or fp32" if self.fp32
                     else "bf16 (precision off?; fp32 packing measured no faster, fp32=True forces it)")
            return f"no {kinds} convolutions or linears in this pipeline"
        return None

    def apply(self, pipe) -> None:
        patched = self._state().setdefault("patched", [])
        for module, packer in self._targets(pipe):
            self.log().set(module, "forward", packer(module))
            patched.append(module)

    def describe(self) -> str:
        patched = self._state().get("patched", [])
        convs = sum(isinstance(m, nn.Conv2d) for m in patched)
        return f"{convs} convolutions and {len(patched) - convs} linears packed for oneDNN"
