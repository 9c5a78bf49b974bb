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
Which convolutions it takes is measured (runtime/optim/dispatch.py): each eligible convolution's call at
the representative size, in its dtype, with its residual, runs as Winograd and as it runs without this
pass (oneDNN's direct convolution, prepacked at level 2), and the faster is kept; likewise each bf16
upsampler's one-kernel doubling against its ``conv_2x`` as it stands. On a CPU with AMX tiles oneDNN's
bf16 convolutions run on the tiles and may win. ``amx=True`` takes every eligible convolution without
measuring (the name is from the AMX guard it replaced).
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

from . import derived_store, dispatch
from .base import Pass
from .components import pipeline_device, pipeline_models
from .derived import derived, served
from .undo import ORDER, entry
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
        # made once per machine: a warm process maps the transform an earlier one stored
        # (runtime/optim/derived_store.py)
        if dtype == torch.float32:
            from runtime.kernels.winograd_f32_cpu import winograd_weight_f32

            entry["u"] = derived_store.cached(conv.weight, "winograd-f32", lambda: winograd_weight_f32(conv.weight),
                                              winograd_weight_f32)
        else:
            from runtime.kernels.winograd_cpu import winograd_weight

            entry["u"] = derived_store.cached(conv.weight, "winograd-bf16", lambda: winograd_weight(conv.weight, up2=up2),
                                              winograd_weight, up2=up2)
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
    # True: take every eligible convolution without measuring (see the module docstring).
    amx: bool = False

    def _targets(self, pipe):
        """The convolutions it can take and the upsamplers whose conv it can take (bf16 only), by model:
        ``{model name: ([(name, conv)], [(name, upsampler)])}``."""
        found = {}
        for model_name, model in dispatch.networks(pipe):
            modules = list(model.named_modules())
            found[model_name] = ([(n, m) for n, m in modules if isinstance(m, Conv2d) and self._takes(m)],
                                 [(n, m) for n, m in modules if isinstance(m, Upsample2D) and self._takes(m.conv)
                                  and m.conv.weight.dtype == torch.bfloat16])
        return found

    def _takes(self, m: nn.Module) -> bool:
        return (plain_3x3(m) and m.weight.dtype in DTYPES and kernel_ready(m.weight.dtype) is None
                and m.in_channels % 2 == 0 and m.in_channels >= self.min_channels and m.out_channels % 32 == 0)

    def supports(self, pipe) -> str | None:
        if pipeline_device(pipe).type != "cpu":
            return f"the Winograd kernels are for CPU; this pipeline is on {pipeline_device(pipe)}"
        why = kernel_ready(torch.bfloat16)
        if why and kernel_ready(torch.float32):
            return why
        if not any(convs for convs, _ in self._targets(pipe).values()):
            return (f"no bf16 or fp32 3x3 stride-1 convolutions with an even input channel count of at least "
                    f"{self.min_channels} and output channels a multiple of 32")
        return None

    def apply(self, pipe) -> None:
        with dispatch.ensure_session():
            self._apply(pipe)

    def _apply(self, pipe) -> None:
        calls, tally, log = dispatch.probe(pipe), dispatch.Tally(), self.log()
        state = self._state()
        patched, doubled = state.setdefault("patched", []), state.setdefault("upsamplers", [])
        eligible = 0
        models = dict(dispatch.networks(pipe))
        for model_name, (convs, upsamplers) in self._targets(pipe).items():
            # an upsampler's conv whose calls its conv_2x takes (the upsample pass's fold) is not measured alone
            doubling = {id(u.conv) for u in models[model_name].modules()
                        if isinstance(u, Upsample2D) and u.conv_2x is not None}
            for name, module in convs:
                eligible += 1
                recorded = [] if id(module) in doubling and not self.amx else calls.of("conv", model_name, name)
                if self._chosen(tally, module, recorded, measure_conv):
                    log.plug(module, "winograd", WinogradConv())
                    patched.append(module)
                    _drop_packed(module)
            for name, module in upsamplers:  # after the convs: the doubling they run against uses them
                if self._chosen(tally, module, calls.of("upsample", model_name, name), measure_upsample):
                    release = getattr(module.conv_2x, "release", None)
                    if release is not None:  # the fold measured against: its copies are not needed now
                        release()
                    log.set(module, "conv_2x", WinogradUpsampleConv(module.conv_2x))
                    doubled.append(module)
        taken = {id(m) for m in patched}
        state["eligible"] = eligible
        state["measurements"] = tally.records()
        state["residuals"] = [block for model in pipeline_models(pipe).values() for block in model.modules()
                              if isinstance(block, ResnetBlock2D) and id(block.conv2) in taken]

    def _chosen(self, tally, module, recorded, measure_one) -> bool:
        """Whether Winograd takes ``module``: forced by ``amx=True``, else measured on its recorded calls
        (a module the shape probe did not reach is left as it runs)."""
        if self.amx:
            key = dispatch.OpKey(measure_one.op, (_weight(module),), _dtype_name(module))
            return tally.add(dispatch.forced(key, "winograd", "direct", "amx=True")).choice == "winograd"
        if not recorded:
            return False
        return dispatch.choose([tally.add(measure_one(module, call)) for call in recorded]) == "winograd"

    def describe(self) -> str:
        state = self._state()
        convs, ups = len(state.get("patched", [])), len(state.get("upsamplers", []))
        text = (f"{convs} of {state.get('eligible', 0)} eligible 3x3 convolutions run as Winograd F(2x2, 3x3), "
                f"{ups} upsamplers' doubling and conv in one kernel, "
                f"{len(state.get('residuals', []))} with their ResNet block's residual add")
        summary = dispatch.summarize(state.get("measurements", []))
        return text + (f"; {summary}" if summary else "")


# ---- measuring ------------------------------------------------------------------------------------------
def _weight(module: nn.Module) -> tuple:
    conv = module.conv if isinstance(module, Upsample2D) else module
    return conv.out_channels, conv.in_channels, conv.bias is not None


def _dtype_name(module: nn.Module) -> str:
    conv = module.conv if isinstance(module, Upsample2D) else module
    return str(conv.weight.dtype).removeprefix("torch.")


def _below(conv: nn.Conv2d, name: str = "winograd"):
    """What ``conv`` runs when no ``name`` entry takes a call: the entries after it in ``ORDER``, then the
    plain operator (prepack's packed convolution at level 2, else oneDNN's direct one)."""
    call = conv._plain
    for n, impl in reversed([e for e in conv.compute if e[0] in ORDER and ORDER.index(e[0]) > ORDER.index(name)]):
        call = (lambda impl, rest: lambda x, add=None: impl(conv, x, rest, add))(impl, call)
    return call


def _inputs(*shapes, dtype):
    made = []

    def get():
        if not made:
            made.extend(torch.randn(*s, dtype=dtype) if s is not None else None for s in shapes)
        return made

    return get


# Maps taller than this are timed on a strip of this many rows (the same width and channels, so the same
# inner loops; time grows with the rows alike for both): a 256x256 VAE map costs a quarter to measure.
MEASURED_ROWS = 64


def _strip(shape, rows: int) -> tuple[tuple, str]:
    """``shape`` (B, C, H, W) with at most ``rows`` rows, and a note when cut."""
    if shape[2] <= rows:
        return tuple(shape), ""
    return (*shape[:2], rows, shape[3]), f"timed on {rows} of {shape[2]} rows"


def measure_conv(conv: nn.Conv2d, call) -> dispatch.Measurement:
    """Winograd against what the convolution runs without it, on one recorded call ``(x shape, add given)``."""
    shape, add = call
    dtype = conv.weight.dtype
    timed, note = _strip(shape, MEASURED_ROWS)
    out = (timed[0], conv.out_channels, timed[2], timed[3])
    inputs, rest, ours = _inputs(timed, out if add else None, dtype=dtype), _below(conv), WinogradConv()
    direct = "prepacked" if entry(conv, "prepack") is not None else "direct"
    candidates = [dispatch.Candidate(direct, lambda: rest(*inputs()), baseline=True),
                  dispatch.Candidate("winograd", lambda: ours(conv, *inputs()[:1], rest, inputs()[1]))]
    key = dispatch.OpKey("conv3x3", (tuple(shape), _weight(conv), add), _dtype_name(conv))
    return dispatch.measure(key, candidates, note=note)


measure_conv.op = "conv3x3"


def measure_upsample(module: Upsample2D, shape) -> dispatch.Measurement:
    """The one-kernel doubling and conv against the upsampler's ``conv_2x`` as it stands (the upsample pass's
    fold, else the nearest doubling and the conv), on one recorded input shape."""
    timed, note = _strip(shape, MEASURED_ROWS // 2)  # the doubled map: MEASURED_ROWS rows
    inputs, ours, previous = _inputs(timed, dtype=module.conv.weight.dtype), WinogradUpsampleConv(module.conv_2x), \
        module.conv_2x
    base = "fold" if previous is not None else "nearest+conv"
    run_base = (lambda: previous(module, inputs()[0])) if previous is not None else \
        (lambda: module.conv(F.interpolate(inputs()[0], scale_factor=2.0, mode="nearest")))
    candidates = [dispatch.Candidate(base, run_base, baseline=True),
                  dispatch.Candidate("winograd", lambda: ours(module, inputs()[0]))]
    return dispatch.measure(dispatch.OpKey("upsample2x_conv3x3", (tuple(shape), _weight(module)),
                                           _dtype_name(module)), candidates, note=note)


measure_upsample.op = "upsample2x_conv3x3"


def _drop_packed(conv: nn.Conv2d) -> None:
    """A convolution Winograd takes never runs its prepacked weight: free the copy measuring made."""
    packed = entry(conv, "prepack")
    if packed is not None:
        packed.packed_cache.clear()
