"""3x3 convolutions as Winograd F(2x2, 3x3) in bf16 on CPU (level 2, exact class: rounding only).

At level 2 the bf16 convolutions already run at this CPU's matmul rate (bench/RESULTS.md, session 12),
so the way to fewer seconds is fewer multiplies: Winograd's minimal filtering computes each 2x2 block
of outputs with 16 multiply-adds per channel pair instead of 36 (kernels/winograd_cpu.py). This pass
gives each bf16 3x3, stride-1, padding-1 ``nn.Conv2d`` of the pipeline's models whose channel counts
the kernel takes (input even and at least ``min_channels``, output a multiple of 32) a forward that
runs it that way, and each ``Upsample2D`` whose conv it takes a ``conv_2x`` that runs the nearest
doubling and the conv in one kernel (9 multiply-adds per input pixel and channel pair: 7 of the
16 transformed positions are zero on a doubled map; the upsample pass's fold takes 16). Other calls
(fp32, autograd, torch.compile tracing, other devices) go to what ran before (prepack's forward, the
upsample pass's fold, when those passes ran first).

The transformed kernel is computed once and rebuilt when the weight's storage, version or dtype
changes, as prepack does. Costs memory: 16/9 of each weight it takes, in bf16, beside the weight
(1.9 GB for SD 1.5's UNet), in place of prepack's packed copies of the same weights, which are then
never made: SD 1.5 at level 2 peaks at 10.2 GB RSS against 9.5 GB without the pass (``winograd=False``
when memory is short). The result differs from the direct bf16 convolution by
rounding only: 2.5x its rms error against fp32, 1.5-2x its max (tests/kernels/test_winograd_cpu.py).
Revert restores the previous forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import Upsample2D

from .base import Pass
from .components import pipeline_device, pipeline_models
from .prepack import weight_cache
from .upsample import plain_3x3


def cpu_winograd_ready() -> str | None:
    # imported here: importing ``kernels`` reads TRITON_INTERPRET, which the kernel tests set first
    from kernels.winograd_cpu import cpu_winograd_ready as ready

    return ready()


def _fast(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this call runs the kernel (else the previous forward: compiling, autograd, fp32, ...); the
    only check per call: the kernel's own (``cpu_winograd_supports``) holds by construction, and a
    channel mismatch goes to the previous forward, which raises torch's error."""
    return not (torch.compiler.is_compiling() or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16
                or x.device.type != "cpu" or x.ndim != 4 or x.numel() == 0 or x.shape[1] != w.shape[1]
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def _transformed(cache: dict, conv: nn.Conv2d, up2: bool):
    """(transformed kernel, bf16 bias) of ``conv``, from ``cache`` while its weight is the same."""
    from kernels.winograd_cpu import winograd_weight

    entry = weight_cache(cache, conv.weight)
    if "u" not in entry:
        entry["u"] = winograd_weight(conv.weight, up2=up2)
        entry["bias"] = None if conv.bias is None else conv.bias.detach().to(torch.bfloat16).contiguous()
    return entry["u"], entry["bias"]


def winograd_conv_forward(conv: nn.Conv2d, previous):
    """A forward for ``conv`` that runs bf16 CPU calls as Winograd and the rest through ``previous``."""
    from kernels.winograd_cpu import winograd_launch

    cache: dict = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast(x, conv.weight):
            return previous(x)
        return winograd_launch(x, *_transformed(cache, conv, up2=False), up2=False)

    forward.winograd_cache = cache
    return forward


class WinogradUpsampleConv:
    """The ``conv_2x`` of one Upsample2D: the nearest doubling and its 3x3 conv as one Winograd kernel
    (9 multiply-adds per input pixel and channel pair; the upsample pass's fold takes 16). Other
    calls go to the ``conv_2x`` it replaced (None: the eager doubling, then the conv)."""

    def __init__(self, previous):
        from kernels.winograd_cpu import winograd_launch

        self.previous, self.cache, self.kernel = previous, {}, winograd_launch

    def __call__(self, module: Upsample2D, x: torch.Tensor) -> torch.Tensor:
        conv = module.conv
        if _fast(x, conv.weight):
            return self.kernel(x, *_transformed(self.cache, conv, up2=True), up2=True)
        if self.previous is not None:
            return self.previous(module, x)
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class WinogradPass(Pass):
    name = "winograd"
    exact = True
    # Below this many input channels the transforms cost more than the multiplies they save (the
    # UNet's first conv reads 4 channels).
    min_channels: int = 32

    def _targets(self, pipe):
        """The convolutions it takes and the upsamplers whose conv it takes."""
        modules = [m for model in pipeline_models(pipe).values() for m in model.modules()]
        return ([m for m in modules if self._takes(m)],
                [m for m in modules if isinstance(m, Upsample2D) and self._takes(m.conv)])

    def _takes(self, m: nn.Module) -> bool:
        return (plain_3x3(m) and m.weight.dtype == torch.bfloat16 and m.in_channels % 2 == 0
                and m.in_channels >= self.min_channels and m.out_channels % 32 == 0)

    def supports(self, pipe) -> str | None:
        if pipeline_device(pipe).type != "cpu":
            return f"the Winograd kernels are for CPU; this pipeline is on {pipeline_device(pipe)}"
        why = cpu_winograd_ready()
        if why:
            return why
        if not self._targets(pipe)[0]:
            return (f"no bf16 3x3 stride-1 convolutions with an even input channel count of at least "
                    f"{self.min_channels} and output channels a multiple of 32 (precision off?)")
        return None

    def apply(self, pipe) -> None:
        convs, upsamplers = self._targets(pipe)
        patched = self._state().setdefault("patched", [])
        for module in convs:
            had = module.__dict__.get("forward")
            module.forward = winograd_conv_forward(module, had or type(module).forward.__get__(module))
            patched.append((module, had))
        doubled = self._state().setdefault("upsamplers", [])
        for module in upsamplers:
            doubled.append((module, module.conv_2x))
            module.conv_2x = WinogradUpsampleConv(module.conv_2x)

    def describe(self) -> str:
        convs, ups = len(self._state().get("patched", [])), len(self._state().get("upsamplers", []))
        return f"{convs} 3x3 convolutions run as Winograd F(2x2, 3x3), {ups} of them with the 2x upsampling before"

    def revert(self, pipe) -> None:
        for module, previous in reversed(self._state().pop("upsamplers", [])):
            module.conv_2x = previous
        for module, had in reversed(self._state().pop("patched", [])):
            if had is None:
                del module.__dict__["forward"]
            else:
                module.forward = had
