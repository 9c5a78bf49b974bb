"""Our fused GroupNorm + SiLU for x86-64 CPUs: bf16 with AVX512-BF16 (group_norm_cpu.c), fp32 with
AVX-512 (group_norm_f32_cpu.c); both from group_norm_drive.h.

``cpu_group_norm_silu(x, groups, weight, bias, eps)`` is ``silu(group_norm(x))`` for a contiguous
or channels-last (what oneDNN's packed convolutions return) bf16 or fp32 CPU tensor with affine
parameters of its dtype: fp32 statistics, one rounding to the dtype, one write. Built and loaded like
attention_cpu (cpu_build.py); ``cpu_group_norm_ready(dtype)`` says why it cannot run here. Under torch.compile it is the
opaque custom op ``diffusion_runtime::cpu_group_norm_silu``.

Reference: the same formula in fp32 (tests/kernels/test_group_norm_cpu.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("group_norm_cpu.c")
SOURCES = {torch.bfloat16: SOURCE, torch.float32: Path(__file__).with_name("group_norm_f32_cpu.c")}
SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}

# Pixels per partial sum in the channels-last statistics (CHUNK in the C source): a split fixed by the
# shape, not the thread count, so results are the same with any number of threads.
NHWC_CHUNK = 256

_states: dict = {dtype: {} for dtype in SOURCES}  # per dtype: the loaded entry points, or "why" not


def cpu_group_norm_ready(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when the ``dtype`` kernel runs on this machine (building it on first call), else why not."""
    if dtype not in SOURCES:
        return f"no CPU kernel for {dtype}"
    return cpu_build.bind(_states[dtype], SOURCES[dtype])  # entry points: group_norm_cpu.h, group_norm_f32_cpu.h


def _channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def cpu_group_norm_supports(x: torch.Tensor, groups: int, weight, bias) -> str | None:
    """None when ``cpu_group_norm_silu`` computes this call, else why not."""
    if x.dtype not in SOURCES or x.device.type != "cpu":
        return f"the CPU kernel is for bfloat16 or float32 CPU tensors, got {x.dtype} on {x.device}"
    if x.ndim < 2 or x.shape[1] % groups or x.numel() == 0:
        return f"want (batch, channels, ...) with channels divisible by {groups} groups, got {tuple(x.shape)}"
    if weight is None or bias is None or weight.dtype != x.dtype or bias.dtype != x.dtype:
        return f"the CPU kernel needs affine weight and bias of the input's dtype ({x.dtype})"
    if not (x.is_contiguous() or _channels_last(x)) or not weight.is_contiguous() or not bias.is_contiguous():
        return "the input must be contiguous or channels-last and the parameters contiguous"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return "the CPU kernel is forward-only and an input requires grad"
    return cpu_group_norm_ready(x.dtype)


def _launch(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel on a call ``cpu_group_norm_supports`` accepted."""
    out = torch.empty_like(x)  # keeps x's memory format
    hw = x[0, 0].numel()
    state, suffix = _states[x.dtype], SUFFIX[x.dtype]
    with cpu_build.profiled("diffusion_runtime::cpu_group_norm_silu"):
        if _channels_last(x):
            scratch = torch.empty(x.shape[0], 4, x.shape[1])
            part = torch.empty(x.shape[0], -(-hw // NHWC_CHUNK), x.shape[1])  # per-chunk partial sums
            state[f"dr_group_norm_silu_nhwc_{suffix}"](x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                                   x.shape[0], x.shape[1], hw, groups, eps, scratch.data_ptr(),
                                                   part.data_ptr(), torch.get_num_threads())
        else:
            state[f"dr_group_norm_silu_{suffix}"](x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                              x.shape[0], x.shape[1], hw, groups, eps, torch.get_num_threads())
    return out


def _run(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    why = cpu_group_norm_supports(x, groups, weight, bias)
    if why is not None:
        raise ValueError(f"cpu_group_norm_silu: {why}")
    return _launch(x, groups, weight, bias, eps)


@torch.library.custom_op("diffusion_runtime::cpu_group_norm_silu", mutates_args=())
def _cpu_group_norm_silu_op(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float) -> torch.Tensor:
    return _run(x, groups, weight, bias, eps)


@_cpu_group_norm_silu_op.register_fake
def _(x, groups, weight, bias, eps):
    return torch.empty_like(x)


def cpu_group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float = 1e-5) -> torch.Tensor:
    """``silu(group_norm(x, groups, weight, bias, eps))`` on bf16 or fp32 CPU tensors; see the module docstring."""
    if torch.compiler.is_compiling():
        return _cpu_group_norm_silu_op(x, groups, weight, bias, eps)
    return _run(x, groups, weight, bias, eps)


def try_cpu_group_norm_silu(x: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor | None:
    """``cpu_group_norm_silu(...)`` where the kernel supports the call, else None (one check per call)."""
    if cpu_group_norm_supports(x, groups, weight, bias) is not None:
        return None
    if torch.compiler.is_compiling():
        return _cpu_group_norm_silu_op(x, groups, weight, bias, eps)
    return _launch(x, groups, weight, bias, eps)
