"""An unfused LoRA adapter's term in one CPU kernel, bf16 (C: lora_cpu.c): ``out += scale * up(down(x))`` in
place, the (rows, r) product kept in registers, each row of ``x`` and ``out`` read once. Needs AVX512-BF16;
``cpu_lora_term_ready()`` says why it cannot run here. runtime/lora/entry.py calls it for adapted Linears at
bf16 on CPU (measured: bench/RESULTS.md, 'LoRA: the adapter term in one kernel').

The weights as the kernel reads them (``lora_kernel_weights``): the down (r, k) and the up's columns in pairs,
(r / 2, n, 2), the rank zero-padded to a multiple of 8 (padded rows add exact zeros).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("lora_cpu.c")
MAX_RANK = 512  # lora_cpu.c's MAX_R
_state: dict = {}


def cpu_lora_term_ready() -> str | None:
    """None when the kernel runs on this machine (building it on first call), else why not."""
    return cpu_build.bind(_state, SOURCE)  # entry point: lora_cpu.h


def lora_kernel_weights(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``down`` (r, k) and ``up`` (n, r) as the kernel reads them, bf16: (r8, k) and (r8 / 2, n, 2), r8 = r rounded
    up to a multiple of 8, the padding zeros."""
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"lora_kernel_weights: want down (r, k) and up (n, r), got {tuple(down.shape)} and {tuple(up.shape)}")
    r, k = down.shape
    n = up.shape[0]
    r8 = -(-r // 8) * 8
    if r8 > MAX_RANK:
        raise ValueError(f"lora_kernel_weights: rank {r} is over the kernel's {MAX_RANK}")
    if r8 == r:
        d, u = down.to(torch.bfloat16).contiguous(), up.to(torch.bfloat16)
    else:
        d = torch.zeros(r8, k, dtype=torch.bfloat16)
        d[:r].copy_(down)
        u = torch.zeros(n, r8, dtype=torch.bfloat16)
        u[:, :r].copy_(up)
    return d, u.t().reshape(r8 // 2, 2, n).transpose(1, 2).contiguous()


def row_stride(t: torch.Tensor) -> int | None:
    """The stride between consecutive rows of ``t`` seen as (numel / last, last), when its last dimension is
    contiguous and its rows evenly spaced (a contiguous tensor, or a column slice of one); else None."""
    if t.ndim and t.is_contiguous():
        return t.shape[-1]
    if t.ndim == 0 or t.stride(-1) != 1:
        return None
    if t.ndim == 1:
        return t.shape[0]
    step = t.stride(-2)
    expect = step
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size != 1 and stride != expect:
            return None
        expect *= size
    return step if step >= t.shape[-1] else None


def cpu_lora_term_supports(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_pairs: torch.Tensor) -> str | None:
    """None when ``cpu_lora_term_(out, x, down, up_pairs, scale)`` computes this call, else why not."""
    if x.dtype != torch.bfloat16 or out.dtype != torch.bfloat16 or x.device.type != "cpu" or out.device.type != "cpu":
        return f"want bf16 CPU tensors, got x {x.dtype} on {x.device}, out {out.dtype} on {out.device}"
    r8, k = down.shape
    if x.shape[-1] != k or out.shape[:-1] != x.shape[:-1] or up_pairs.shape != (r8 // 2, out.shape[-1], 2):
        return (f"shapes do not agree: x {tuple(x.shape)}, out {tuple(out.shape)}, down {tuple(down.shape)}, "
                f"up pairs {tuple(up_pairs.shape)}")
    if down.dtype != torch.bfloat16 or up_pairs.dtype != torch.bfloat16 or not (down.is_contiguous() and up_pairs.is_contiguous()):
        return "want contiguous bf16 kernel weights (lora_kernel_weights)"
    if r8 % 8 or r8 > MAX_RANK:
        return f"want a rank padded to a multiple of 8, at most {MAX_RANK}; got {r8}"
    if row_stride(x) is None or row_stride(out) is None:
        return "want inputs and outputs with a contiguous last dimension and evenly spaced rows"
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return "the CPU kernel is forward-only and a tensor requires grad"
    return cpu_lora_term_ready()


def lora_term_launch(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_pairs: torch.Tensor,
                     scale: float, ldx: int | None = None, ldo: int | None = None) -> torch.Tensor:
    """The kernel without ``cpu_lora_term_supports``: ``out`` (written in place) plus ``scale * up(down(x))``;
    ``ldx``/``ldo``: the row strides (``row_stride``) where the caller has them."""
    k, n = x.shape[-1], out.shape[-1]
    m = x.numel() // k if k else 0
    if m and n:
        with cpu_build.profiled("diffusion_runtime::cpu_lora_term"):
            failed = _state["dr_lora_term_bf16"](x.data_ptr(), ldx or row_stride(x), down.data_ptr(), up_pairs.data_ptr(),
                                                 out.data_ptr(), ldo or row_stride(out), m, k, down.shape[0], n, float(scale),
                                                 torch.get_num_threads())
        if failed:
            raise MemoryError(f"cpu_lora_term_: no memory for the kernel's scratch rows (rank {down.shape[0]}, {n} columns)")
    return out


def cpu_lora_term_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up_pairs: torch.Tensor,
                   scale: float = 1.0) -> torch.Tensor:
    """``out += scale * (x @ down.T) @ up.T`` in place, with ``down, up_pairs = lora_kernel_weights(down, up)``."""
    why = cpu_lora_term_supports(out, x, down, up_pairs)
    if why is not None:
        raise ValueError(f"cpu_lora_term_: {why}")
    return lora_term_launch(out, x, down, up_pairs, scale)
