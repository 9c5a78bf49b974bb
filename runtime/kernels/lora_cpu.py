"""An unfused LoRA adapter's term in one CPU kernel, bf16 or fp32 (C: lora_cpu.c, lora_f32_cpu.c; the work split
in lora_drive.h): ``out += scale * up(down(x))`` in place, the (rows, r) product kept in registers, each row of
``x`` and ``out`` read once. The bf16 kernel needs AVX512-BF16, the fp32 one AVX-512; ``cpu_lora_term_ready(dtype)``
says why one cannot run here. runtime/lora/entry.py calls it for adapted Linears and channels-last 1x1
convolutions on CPU where runtime/lora/term_kernel.py measured it faster (bench/RESULTS.md, 'LoRA: the adapter
term in one kernel').

The weights as the kernels read them (``lora_kernel_weights``): the down (r, k); the up's columns in pairs,
(r / 2, n, 2), in bf16 (vdpbf16ps multiplies pairs), the up transposed, (r, n), in fp32; the rank zero-padded to
a multiple of 8 (padded rows add exact zeros). In bf16 the down product is rounded to bf16 before the up
product, as the two-matmul path rounds it; in fp32 nothing is rounded between the two.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCES = {torch.bfloat16: Path(__file__).with_name("lora_cpu.c"),
           torch.float32: Path(__file__).with_name("lora_f32_cpu.c")}
_ENTRY = {torch.bfloat16: "dr_lora_term_bf16", torch.float32: "dr_lora_term_f32"}
MAX_RANK = 512  # lora_drive.h's LORA_MAX_R
_states: dict = {torch.bfloat16: {}, torch.float32: {}}


def cpu_lora_term_ready(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when the kernel for ``dtype`` (bf16 or fp32) runs on this machine (building it on first call), else
    why not."""
    if dtype not in SOURCES:
        return f"the kernel is for bf16 or fp32, not {dtype}"
    return cpu_build.bind(_states[dtype], SOURCES[dtype])  # entry points: lora_cpu.h, lora_f32_cpu.h


def lora_kernel_weights(down: torch.Tensor, up: torch.Tensor,
                        dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``down`` (r, k) and ``up`` (n, r) as the ``dtype`` kernel reads them: (r8, k), and (r8 / 2, n, 2) in bf16 or
    (r8, n) in fp32; r8 = r rounded up to a multiple of 8, the padding zeros."""
    if dtype not in SOURCES:
        raise ValueError(f"lora_kernel_weights: dtype must be bf16 or fp32, got {dtype}")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"lora_kernel_weights: want down (r, k) and up (n, r), got {tuple(down.shape)} and "
                         f"{tuple(up.shape)}")
    r, k = down.shape
    n = up.shape[0]
    r8 = -(-r // 8) * 8
    if r8 > MAX_RANK:
        raise ValueError(f"lora_kernel_weights: rank {r} is over the kernel's {MAX_RANK}")
    if r8 == r:
        d, u = down.to(dtype).contiguous(), up.to(dtype)
    else:
        d = torch.zeros(r8, k, dtype=dtype)
        d[:r].copy_(down)
        u = torch.zeros(n, r8, dtype=dtype)
        u[:, :r].copy_(up)
    if dtype == torch.float32:
        return d, u.t().contiguous()
    return d, u.t().reshape(r8 // 2, 2, n).transpose(1, 2).contiguous()


def _up_shape(r8: int, n: int, dtype: torch.dtype) -> tuple[int, ...]:
    return (r8 // 2, n, 2) if dtype == torch.bfloat16 else (r8, n)


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


def cpu_lora_term_supports(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """None when ``cpu_lora_term_(out, x, down, up, scale)`` computes this call, else why not."""
    if x.dtype not in SOURCES or out.dtype != x.dtype or x.device.type != "cpu" or out.device.type != "cpu":
        return (f"want bf16 or fp32 CPU tensors of one dtype, got x {x.dtype} on {x.device}, "
                f"out {out.dtype} on {out.device}")
    r8, k = down.shape
    if x.shape[-1] != k or out.shape[:-1] != x.shape[:-1] or tuple(up.shape) != _up_shape(r8, out.shape[-1], x.dtype):
        return (f"shapes do not agree: x {tuple(x.shape)}, out {tuple(out.shape)}, down {tuple(down.shape)}, "
                f"up {tuple(up.shape)}")
    if down.dtype != x.dtype or up.dtype != x.dtype or not (down.is_contiguous() and up.is_contiguous()):
        return f"want contiguous {x.dtype} kernel weights (lora_kernel_weights)"
    if r8 % 8 or r8 > MAX_RANK:
        return f"want a rank padded to a multiple of 8, at most {MAX_RANK}; got {r8}"
    if row_stride(x) is None or row_stride(out) is None:
        return "want inputs and outputs with a contiguous last dimension and evenly spaced rows"
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        return "the CPU kernel is forward-only and a tensor requires grad"
    return cpu_lora_term_ready(x.dtype)


def lora_term_launch(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                     scale: float, ldx: int | None = None, ldo: int | None = None) -> torch.Tensor:
    """The kernel without ``cpu_lora_term_supports``: ``out`` (written in place) plus ``scale * up(down(x))``;
    ``ldx``/``ldo``: the row strides (``row_stride``) where the caller has them."""
    k, n = x.shape[-1], out.shape[-1]
    m = x.numel() // k if k else 0
    if m and n:
        with cpu_build.profiled("diffusion_runtime::cpu_lora_term"):
            failed = _states[x.dtype][_ENTRY[x.dtype]](x.data_ptr(), ldx or row_stride(x), down.data_ptr(),
                                                       up.data_ptr(), out.data_ptr(), ldo or row_stride(out), m, k,
                                                       down.shape[0], n, float(scale), torch.get_num_threads())
        if failed:
            raise MemoryError(f"cpu_lora_term_: no memory for the kernel's scratch rows (rank {down.shape[0]}, "
                              f"{n} columns)")
    return out


def cpu_lora_term_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                   scale: float = 1.0) -> torch.Tensor:
    """``out += scale * (x @ down.T) @ up.T`` in place, with ``down, up = lora_kernel_weights(down, up, x.dtype)``."""
    why = cpu_lora_term_supports(out, x, down, up)
    if why is not None:
        raise ValueError(f"cpu_lora_term_: {why}")
    return lora_term_launch(out, x, down, up, scale)
