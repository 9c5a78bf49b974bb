"""Our fused attention for x86-64 CPUs: bf16 with AVX512-BF16 (C: attention_cpu.c), fp32 with AVX-512
(attention_f32_cpu.c).

``cpu_attention(q, k, v)`` computes ``softmax(q kᵀ / sqrt(d)) v`` for bf16 or fp32 ``(batch, heads, tokens,
head_dim)`` tensors, like PyTorch's SDPA without a mask, and returns its output as a
``(batch, heads, tokens, head_dim)`` view of ``(batch, tokens, heads, head_dim)`` memory, so that
merging the heads afterwards is free. Inputs may be any strided view with a contiguous last dim
(the head split of a projection is read in place).

The sources are prebuilt with the package or compiled on first use with the system C compiler, loaded with
ctypes (cpu_build.py; entry points declared in attention_cpu.h and attention_f32_cpu.h), and run with the
thread count torch uses. ``cpu_attention_ready(dtype)`` says why
a kernel cannot run here (not x86-64, no AVX512-BF16 / AVX-512, no compiler, a failed build); callers
then use SDPA. Under torch.compile it is the opaque custom op ``diffusion_runtime::cpu_attention``.

Reference: SDPA in fp64 and fp32 (tests/kernels/test_attention_cpu.py); the error is that of SDPA in
the same dtype.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpu_build

SOURCES = {torch.bfloat16: Path(__file__).with_name("attention_cpu.c"),
           torch.float32: Path(__file__).with_name("attention_f32_cpu.c")}
_ENTRY = {torch.bfloat16: "dr_attention_bf16", torch.float32: "dr_attention_f32"}
MAX_HEAD_DIM = 128
MAX_HEAD_DIM_F32 = 80  # beyond it PyTorch's fp32 SDPA measured as fast (bench/RESULTS.md, session 16)

_states: dict = {torch.bfloat16: {}, torch.float32: {}}  # per dtype: the entry point, or "why" it is unavailable


def cpu_attention_ready(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when the kernel for ``dtype`` (bf16 or fp32) runs on this machine (building it on first call),
    else why not."""
    if dtype not in SOURCES:
        return f"the CPU kernels are for bfloat16 and float32, not {dtype}"
    return cpu_build.bind(_states[dtype], SOURCES[dtype])  # entry points: attention_cpu.h, attention_f32_cpu.h


def cpu_attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> str | None:
    """None when ``cpu_attention(q, k, v)`` computes this call, else why not (then use SDPA)."""
    if mask is not None:
        return "attention masks are not supported"
    if q.dtype not in SOURCES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype}: the CPU kernels are for bfloat16 or float32, all three alike"
    if any(t.device.type != "cpu" for t in (q, k, v)):
        return "tensors are not on the CPU"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"want (batch, heads, tokens, head_dim) tensors, got {q.ndim}-D/{k.ndim}-D/{v.ndim}-D"
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape != v.shape or k.shape[3] != d:
        return f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    top = MAX_HEAD_DIM_F32 if q.dtype == torch.float32 else MAX_HEAD_DIM
    if not 1 <= d <= top or q.shape[2] < 1 or k.shape[2] < 1:
        return f"head_dim {d} (1..{top} in {'fp32' if top == MAX_HEAD_DIM_F32 else 'bf16'}) or an empty sequence"
    if any(t.stride(3) != 1 for t in (q, k, v)):
        return "the head dim must be contiguous"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "the CPU kernel is forward-only and an input requires grad"
    return cpu_attention_ready(q.dtype)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The kernel on a call ``cpu_attention_supports`` accepted."""
    b, h, tq, d = q.shape
    out = torch.empty(b, tq, h, d, dtype=q.dtype).transpose(1, 2)
    strides = [(ctypes.c_int64 * 4)(*t.stride()) for t in (q, k, v, out)]
    with cpu_build.profiled("diffusion_runtime::cpu_attention"):  # visible to bench/profile_step.py
        rc = _states[q.dtype][_ENTRY[q.dtype]](q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, tq,
                                               k.shape[2], d, *strides, d ** -0.5, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"cpu_attention: the kernel returned {rc} for q {tuple(q.shape)}, k {tuple(k.shape)} "
                           "(1: unsupported shape, 2: out of memory)")
    return out


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    why = cpu_attention_supports(q, k, v)
    if why is not None:
        raise ValueError(f"cpu_attention: {why}")
    return _launch(q, k, v)


@torch.library.custom_op("diffusion_runtime::cpu_attention", mutates_args=())
def _cpu_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _run(q, k, v)


@_cpu_attention_op.register_fake
def _(q, k, v):
    b, h, tq, d = q.shape
    return q.new_empty(b, tq, h, d).transpose(1, 2)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` on bf16 or fp32 CPU tensors; see the module docstring."""
    if torch.compiler.is_compiling():
        return _cpu_attention_op(q, k, v)
    return _run(q, k, v)


def try_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor | None:
    """``cpu_attention(q, k, v)`` where the kernel supports the call, else None (one check per call)."""
    if cpu_attention_supports(q, k, v, mask) is not None:
        return None
    return _cpu_attention_op(q, k, v) if torch.compiler.is_compiling() else _launch(q, k, v)
