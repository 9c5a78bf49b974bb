"""Convolution weights packed once for oneDNN on CPU (level 2, near-exact with precision).

Eager ``F.conv2d`` on CPU hands oneDNN plain NCHW weights, and oneDNN reorders them into its
blocked layout on every call: at the UNet's deep, small-spatial layers that reorder costs as
much as the convolution (512 channels at 8x8: 2.1 ms eager against 1.4 ms packed; SD 1.5 at
256x256: the UNet call 1.20x faster, small 1.07x; bench/RESULTS.md). This pass gives each bf16
``nn.Conv2d`` of the UNet and VAE (fp32 ones too with ``fp32=True``; measured no faster) a forward that packs its weight once per input shape
(``mkldnn_reorder_conv2d_weight``) and calls oneDNN's convolution with the packed weight.

The packed copy follows the weight: it is rebuilt when the weight's storage, version or dtype
changes (precision switching dtypes, a user loading new weights), so it is never stale. Costs
memory: one packed copy of every convolution weight per input shape seen. Under torch.compile,
or when autograd needs the graph, the plain convolution runs (inductor packs weights itself when
it freezes). Revert deletes the per-instance forward: the module is what it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Pass
from .components import pipeline_device, pipeline_models


def _packable(conv: nn.Conv2d, dtypes) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and conv.weight.dtype in dtypes


def packed_forward(conv: nn.Conv2d):
    """A forward for ``conv`` that keeps its oneDNN-packed weight per input shape."""
    cache: dict = {}
    padding, stride, dilation, groups = list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != w.dtype or x.ndim != 4
                or w.dtype not in (torch.float32, torch.bfloat16)
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return conv._conv_forward(x, w, conv.bias)
        owner = (w.data_ptr(), w._version, w.dtype)
        if cache.get("owner") != owner:
            cache.clear()
            cache["owner"] = owner
        key = tuple(x.shape)
        packed = cache.get(key)
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.detach().to_mkldnn(), padding, stride, dilation,
                                                               groups, list(x.shape))
            cache[key] = packed
        return torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, padding, stride, dilation, groups,
                                                       "none", [], "")

    forward.packed_cache = cache
    return forward


def mkldnn_usable() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return "this torch build has no mkldnn._convolution_pointwise"
    return None


@dataclass(frozen=True)
class ConvPrepackPass(Pass):
    name = "conv_prepack"
    exact = True
    # fp32 convolutions too: measured no faster packed on this CPU (0.98x end to end on small), so
    # by default only bf16 ones (after precision) are packed and fp32 weights are not duplicated.
    fp32: bool = False

    def _dtypes(self):
        return (torch.bfloat16, torch.float32) if self.fp32 else (torch.bfloat16,)

    def _targets(self, pipe):
        return [c for m in pipeline_models(pipe).values() for c in m.modules()
                if isinstance(c, nn.Conv2d) and "forward" not in c.__dict__ and _packable(c, self._dtypes())]

    def supports(self, pipe) -> str | None:
        if pipeline_device(pipe).type != "cpu":
            return f"packing for oneDNN is a CPU path; this pipeline is on {pipeline_device(pipe)}"
        why = mkldnn_usable()
        if why:
            return why
        if not self._targets(pipe):
            kinds = "bf16 or fp32" if self.fp32 else "bf16 (precision off?; fp32 packing measured no faster, fp32=True forces it)"
            return f"no {kinds} convolutions in this pipeline"
        return None

    def apply(self, pipe) -> None:
        patched = self._state().setdefault("patched", [])
        for conv in self._targets(pipe):
            conv.forward = packed_forward(conv)
            patched.append(conv)
        self._state()["count"] = len(patched)

    def describe(self) -> str:
        return f"{self._state().get('count', 0)} convolutions packed for oneDNN once per input shape"

    def revert(self, pipe) -> None:
        for conv in self._state().pop("patched", []):
            del conv.__dict__["forward"]
