"""Our fused bf16 GEGLU activation for x86-64 CPUs with AVX512-BF16 (C source: geglu_cpu.c).

``cpu_geglu(proj)`` is ``value * gelu(gate)`` of ``value, gate = proj.chunk(2, -1)`` for a bf16
CPU tensor, in one pass over memory with the exact (erf) GELU in fp32 and one rounding to bf16.
Built and loaded like attention_cpu (cpu_build.py); ``cpu_geglu_ready()`` says why it cannot run
here. Under torch.compile it is the opaque custom op ``diffusion_runtime::cpu_geglu``.

Reference: the same formula in fp32 (tests/kernels/test_geglu_cpu.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("geglu_cpu.c")

_state: dict = {}  # the loaded entry point by name, or "why": the reason it is unavailable


def cpu_geglu_ready() -> str | None:
    """None when the kernel runs on this machine (building it on first call), else why not."""
    return cpu_build.bind(_state, SOURCE)  # entry point: geglu_cpu.h


def cpu_geglu_supports(proj: torch.Tensor) -> str | None:
    """None when ``cpu_geglu(proj)`` computes this call, else why not."""
    if proj.dtype != torch.bfloat16 or proj.device.type != "cpu":
        return f"the CPU kernel is for bfloat16 CPU tensors, got {proj.dtype} on {proj.device}"
    if proj.ndim < 1 or proj.shape[-1] % 2:
        return f"the last dim must be even (value and gate halves), got shape {tuple(proj.shape)}"
    if not proj.is_contiguous():
        return "the projection must be contiguous"
    if torch.is_grad_enabled() and proj.requires_grad:
        return "the CPU kernel is forward-only and the input requires grad"
    return cpu_geglu_ready()


def _launch(proj: torch.Tensor) -> torch.Tensor:
    """The kernel on a call ``cpu_geglu_supports`` accepted."""
    n = proj.shape[-1] // 2
    out = proj.new_empty(*proj.shape[:-1], n)
    rows = proj.numel() // (2 * n) if n else 0
    if rows:
        with cpu_build.profiled("diffusion_runtime::cpu_geglu"):
            _state["dr_geglu_bf16"](proj.data_ptr(), out.data_ptr(), rows, n, 2 * n, n, torch.get_num_threads())
    return out


def _run(proj: torch.Tensor) -> torch.Tensor:
    why = cpu_geglu_supports(proj)
    if why is not None:
        raise ValueError(f"cpu_geglu: {why}")
    return _launch(proj)


@torch.library.custom_op("diffusion_runtime::cpu_geglu", mutates_args=())
def _cpu_geglu_op(proj: torch.Tensor) -> torch.Tensor:
    return _run(proj)


@_cpu_geglu_op.register_fake
def _(proj):
    return proj.new_empty(*proj.shape[:-1], proj.shape[-1] // 2)


def cpu_geglu(proj: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` of ``proj.chunk(2, -1)`` on a bf16 CPU tensor; see the module docstring."""
    if torch.compiler.is_compiling():
        return _cpu_geglu_op(proj)
    return _run(proj)


def try_cpu_geglu(proj: torch.Tensor) -> torch.Tensor | None:
    """``cpu_geglu(proj)`` where the kernel supports the call, else None (one check per call)."""
    if cpu_geglu_supports(proj) is not None:
        return None
    return _cpu_geglu_op(proj) if torch.compiler.is_compiling() else _launch(proj)
