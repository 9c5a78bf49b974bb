"""Our fused bf16 GroupNorm + SiLU for x86-64 CPUs with AVX512-BF16 (C source: group_norm_cpu.c).

``cpu_group_norm_silu(x, groups, weight, bias, eps)`` is ``silu(group_norm(x))`` for a contiguous
or channels-last (what oneDNN's packed convolutions return) bf16 CPU tensor with bf16 affine
parameters: fp32 statistics, one rounding to bf16, one write. Built and loaded like attention_cpu
(cpu_build.py); ``cpu_group_norm_ready()`` says why it cannot run here. Under torch.compile it is the
opaque custom op ``diffusion_runtime::cpu_group_norm_silu``.

Reference: the same formula in fp32 (tests/kernels/test_group_norm_cpu.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("group_norm_cpu.c")

# Pixels per partial sum in the channels-last statistics (CHUNK in the C source): a split fixed by the
# shape, not the thread count, so results are the same with any number of threads.
NHWC_CHUNK = 256

_state: dict = {}  # the loaded entry points by name, or "why": the reason they are unavailable


def cpu_group_norm_ready() -> str | None:
    """None when the kernel runs on this machine (building it on first call), else why not."""
    return cpu_build.bind(_state, SOURCE)  # entry points: group_norm_cpu.h


def _channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def cpu_group_norm_supports(x: torch.Tensor, groups: int, weight, bias) -> str | None:
    """None when ``cpu_group_norm_silu`` computes this call, else why not."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return f"the CPU kernel is for bfloat16 CPU tensors, got {x.dtype} on {x.device}"
    if x.ndim < 2 or x.shape[1] % groups or x.numel() == 0:
        return f"want (batch, channels, ...) with channels divisible by {groups} groups, got {tuple(x.shape)}"
    if weight is None or bias is None or weight.dtype != torch.bfloat16 or bias.dtype != torch.bfloat16:
        return "the CPU kernel needs bf16 affine weight and bias"
    if not (x.is_contiguous() or _channels_last(x)) or not weight.is_contiguous() or not bias.is_contiguous():
        return "the input must be contiguous or channels-last and the parameters contiguous"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return "the CPU kernel is forward-only and an input requires grad"
    return cpu_group_norm_ready()


def _launch(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel on a call ``cpu_group_norm_supports`` accepted."""
    out = torch.empty_like(x)  # keeps x's memory format
    hw = x[0, 0].numel()
    with cpu_build.profiled("diffusion_runtime::cpu_group_norm_silu"):
        if _channels_last(x):
            scratch = torch.empty(x.shape[0], 4, x.shape[1])
            part = torch.empty(x.shape[0], -(-hw // NHWC_CHUNK), x.shape[1])  # per-chunk partial sums
            _state["dr_group_norm_silu_nhwc_bf16"](x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                                   x.shape[0], x.shape[1], hw, groups, eps, scratch.data_ptr(),
                                                   part.data_ptr(), torch.get_num_threads())
        else:
            _state["dr_group_norm_silu_bf16"](x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
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
    """``silu(group_norm(x, groups, weight, bias, eps))`` on bf16 CPU tensors; see the module docstring."""
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
