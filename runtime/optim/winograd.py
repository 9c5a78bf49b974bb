"""3x3 convolutions as Winograd F(2x2, 3x3) on CPU, bf16 or fp32 (level 1, exact class: rounding only).

The direct convolutions run at this CPU's matmul rate (bench/RESULTS.md, sessions 12 and 15), so the way
to fewer seconds is fewer multiplies: Winograd's minimal filtering computes each 2x2 block of outputs
with 16 multiply-adds per channel pair instead of 36 (runtime/kernels/winograd_cpu.py for bf16,
runtime/kernels/winograd_f32_cpu.py for fp32). This pass gives each bf16 or fp32 3x3, stride-1, padding-1
``nn.Conv2d`` of the pipeline's models whose channel counts the kernels take (input even and at least
``min_channels``, output a multiple of 32) a forward that runs it that way, and each ``Upsample2D``
whose conv it takes a ``conv_2x`` that runs the nearest doubling and the conv in one kernel, in bf16
(9 multiply-adds per input pixel and channel pair: 7 of the 16 transformed positions are zero on a
doubled map; the upsample pass's fold takes 16). Other calls (autograd, torch.compile tracing, other
devices, a dtype other than the weight's; fp32 upsampling) go to what ran before (prepack's forward,
the upsample pass's fold, when those passes ran first).

The transformed kernel is computed on first use and rebuilt when the weight's storage, version or
dtype changes, as prepack does. Costs memory: 16/9 of each weight it takes, in the weight's dtype,
beside the weight: SD 1.5's UNet holds more memory with the pass than without it at level 1 (fp32) and
at level 2 (bf16, in place of prepack's packed copies, which are then never made) (measured:
bench/RESULTS.md, session 15, 'Winograd in fp32, and the pass at level 1', and 'Figures moved from
docstrings'; ``winograd=False`` when memory is short); a weight precision left on file pages hands
its own pages back once transformed (``served``, runtime/optim/derived.py). In bf16 the result differs from the direct
convolution by rounding only, with a larger rms and max error against fp32 than the direct convolution's
(measured: bench/RESULTS.md, session 14, 'Winograd F(2x2, 3x3) convolutions', and 'Figures moved
from docstrings'; tests/kernels/test_winograd_cpu.py); in fp32 its error against fp64 is the direct
fp32 convolution's (tests/kernels/test_winograd_f32_cpu.py).
On a CPU with AMX tiles the bf16 convolutions stay with oneDNN, whose tile matmuls are expected to
outrun these vdpbf16ps products by more than the 2.25x Winograd saves (runtime/optim/hardware.py; ``amx=True``
takes them anyway); the fp32 ones (AMX has no fp32) are taken.
A ResnetBlock2D calls its second conv with the block's residual as the layer's ``add`` input
(runtime/models/layers.py); the entry adds it inside the kernel's output transform (one pass over the
output fewer; in bf16 one rounding fewer). Revert removes the entries and slots (the undo log).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.layers import Conv2d
from runtime.models.resnet import ResnetBlock2D, Upsample2D

from .base import Pass
from .components import pipeline_device, pipeline_models
from .hardware import AMX_REASON, cpu_has_amx
from .derived import derived, served
from .undo import entry
from .upsample import plain_3x3


DTYPES = (torch.bfloat16, torch.float32)


def kernel_ready(dtype: torch.dtype) -> str | None:
    """None when the kernel for ``dtype`` runs here, else why not."""
    # imported here: importing ``runtime.kernels`` reads TRITON_INTERPRET, which the kernel tests set first
    if dtype == torch.float32:
        from runtime.kernels.winograd_f32_cpu import cpu_winograd_f32_ready as ready
    else:
        from runtime.kernels.winograd_cpu import cpu_winograd_ready as ready
    return ready()


def _fast(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this call runs a kernel (else the previous forward: compiling, autograd, mixed dtypes...);
    the only check per call: the kernel's own (``cpu_winograd_supports``) holds by construction, and a
    channel mismatch goes to the previous forward, which raises torch's error."""
    return not (torch.compiler.is_compiling() or x.dtype != w.dtype or w.dtype not in DTYPES
                or x.device.type != "cpu" or x.ndim != 4 or x.numel() == 0 or x.shape[1] != w.shape[1]
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def _transformed(cache: dict, conv: nn.Conv2d, up2: bool):
    """(transformed kernel, bias in the weight's dtype) of ``conv``, from ``cache`` while its weight is the same."""
    entry = derived(cache, conv.weight)
    if "u" not in entry:
        dtype = conv.weight.dtype
        if dtype == torch.float32:
            from runtime.kernels.winograd_f32_cpu import winograd_weight_f32

            entry["u"] = winograd_weight_f32(conv.weight)
        else:
            from runtime.kernels.winograd_cpu import winograd_weight

            entry["u"] = winograd_weight(conv.weight, up2=up2)
        entry["bias"] = None if conv.bias is None else conv.bias.detach().to(dtype).contiguous()
        served(conv.weight)
    return entry["u"], entry["bias"]


class WinogradConv:
    """The ``winograd`` entry of a 3x3 convolution's compute chain: bf16 and fp32 CPU calls as Winograd,
    the rest handed on (to prepack's entry when that pass ran, else the plain convolution)."""

    def __init__(self):
        from runtime.kernels.winograd_cpu import winograd_launch
        from runtime.kernels.winograd_f32_cpu import winograd_launch_f32

        self.winograd_cache: dict = {}
        self.bf16, self.fp32 = winograd_launch, winograd_launch_f32

    same_operator = True  # the layer's own convolution, another way (runtime/models/layers.py)

    def __call__(self, conv: nn.Conv2d, x: torch.Tensor, rest, add=None) -> torch.Tensor:
        if not _fast(x, conv.weight) or (add is not None and not _fits(add, x, conv)):
            return rest(x, add)
        u, bias = _transformed(self.winograd_cache, conv, up2=False)
        # ``add`` (a ResNet block's residual) goes into the output transform: one pass over the
        # output fewer; bf16 rounds once instead of twice, fp32 gives the same sum bit for bit.
        if x.dtype == torch.float32:
            return self.fp32(x, u, bias, residual=add)
        return self.bf16(x, u, bias, up2=False, residual=add)


def _fits(add: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the kernels can add ``add`` to the output of ``conv`` on ``x`` (same dtype and shape)."""
    return add.dtype == x.dtype and tuple(add.shape) == (x.shape[0], conv.out_channels, x.shape[2], x.shape[3])


def winograd_conv_forward(conv: nn.Conv2d, previous):
    """A forward for any ``nn.Conv2d`` that runs bf16 and fp32 CPU calls as Winograd and the rest through ``previous``."""
    impl = WinogradConv()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return impl(conv, x, lambda x, add=None: previous(x), None)

    forward.winograd_cache = impl.winograd_cache
    return forward


class WinogradUpsampleConv:
    """The ``conv_2x`` of one Upsample2D: the nearest doubling and its 3x3 conv as one Winograd kernel
    (9 multiply-adds per input pixel and channel pair; the upsample pass's fold takes 16). Other
    calls go to the ``conv_2x`` it replaced (None: the eager doubling, then the conv)."""

    def __init__(self, previous):
        from runtime.kernels.winograd_cpu import winograd_launch

        self.previous, self.cache, self.kernel = previous, {}, winograd_launch

    def __call__(self, module: Upsample2D, x: torch.Tensor) -> torch.Tensor:
        conv = module.conv
        # the fold computes the conv from its weight: only while its chain is the conv itself
        if _fast(x, conv.weight) and x.dtype == torch.bfloat16 and conv.computes_operator():  # no fp32 kernel for doubling
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
    # Take bf16 convolutions on CPUs with AMX tiles too (see the module docstring).
    amx: bool = False

    def _targets(self, pipe):
        """The convolutions it takes and the upsamplers whose conv it takes (bf16 only)."""
        modules = [m for model in pipeline_models(pipe).values() for m in model.modules()]
        return ([m for m in modules if isinstance(m, Conv2d) and self._takes(m)],
                [m for m in modules if isinstance(m, Upsample2D) and self._takes(m.conv)
                 and m.conv.weight.dtype == torch.bfloat16])

    def _takes(self, m: nn.Module) -> bool:
        return (plain_3x3(m) and m.weight.dtype in DTYPES and kernel_ready(m.weight.dtype) is None
                and m.in_channels % 2 == 0 and m.in_channels >= self.min_channels and m.out_channels % 32 == 0
                and not (m.weight.dtype == torch.bfloat16 and self._leaves_bf16()))

    def _leaves_bf16(self) -> bool:
        """Whether bf16 convolutions stay with oneDNN (AMX tiles here, and not ``amx=True``)."""
        return not self.amx and cpu_has_amx()

    def _bf16_left(self, pipe) -> bool:
        """Whether the pipeline has bf16 3x3 convolutions this pass leaves to oneDNN on AMX."""
        return self._leaves_bf16() and any(plain_3x3(m) and m.weight.dtype == torch.bfloat16
                                           for model in pipeline_models(pipe).values() for m in model.modules())

    def supports(self, pipe) -> str | None:
        if pipeline_device(pipe).type != "cpu":
            return f"the Winograd kernels are for CPU; this pipeline is on {pipeline_device(pipe)}"
        why = kernel_ready(torch.bfloat16)
        if why and kernel_ready(torch.float32):
            return why
        if not self._targets(pipe)[0]:
            if self._bf16_left(pipe):
                return f"bf16 convolutions: {AMX_REASON}; amx=True takes them"
            return (f"no bf16 or fp32 3x3 stride-1 convolutions with an even input channel count of at least "
                    f"{self.min_channels} and output channels a multiple of 32")
        return None

    def apply(self, pipe) -> None:
        convs, upsamplers = self._targets(pipe)
        self._state()["left_bf16"] = self._bf16_left(pipe)
        log = self.log()
        patched = self._state().setdefault("patched", [])
        for module in convs:
            log.plug(module, "winograd", WinogradConv())
            patched.append(module)
        doubled = self._state().setdefault("upsamplers", [])
        for module in upsamplers:
            log.set(module, "conv_2x", WinogradUpsampleConv(module.conv_2x))
            doubled.append(module)
        taken = {id(m) for m in convs}
        self._state()["residuals"] = [block for model in pipeline_models(pipe).values() for block in model.modules()
                                      if isinstance(block, ResnetBlock2D) and id(block.conv2) in taken]

    def describe(self) -> str:
        convs, ups = len(self._state().get("patched", [])), len(self._state().get("upsamplers", []))
        text = (f"{convs} 3x3 convolutions run as Winograd F(2x2, 3x3), {ups} of them with the 2x upsampling before, "
                f"{len(self._state().get('residuals', []))} with their ResNet block's residual add")
        return text + (f"; bf16 ones left to oneDNN: {AMX_REASON}" if self._state().get("left_bf16") else "")
