"""The GEGLU feed-forward's projection and activation in one bf16 CPU kernel (C: linear_geglu_cpu.c).

``cpu_linear_geglu(x, wp, bias)`` is ``value * gelu(gate)`` of ``value, gate = linear(x, w, bias).chunk(2, -1)``
with ``wp = linear_geglu_weight(w)``: the products on vdpbf16ps with fp32 sums, the bias and the exact
GELU on those sums, one rounding to bf16, and the (rows, 2d) projection never written. The unfused
path (oneDNN's linear, then the GEGLU kernel) rounds the projection to bf16 first: this one is
closer to fp32 (tests/kernels/test_linear_geglu_cpu.py) and 1.1-1.5x faster on the SD UNets' shapes
(bench/RESULTS.md). Needs AVX512-BF16; ``cpu_linear_geglu_ready()`` says why it cannot run here.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("linear_geglu_cpu.c")

_state: dict = {}


def cpu_linear_geglu_ready() -> str | None:
    """None when the kernel runs on this machine (building it on first call), else why not."""
    return cpu_build.bind(_state, SOURCE, lambda: {"dr_linear_geglu_bf16": (None, [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
        ctypes.c_int])})


def linear_geglu_weight(w: torch.Tensor) -> torch.Tensor:
    """A (2d, k) linear weight (value rows, then gate rows) as the kernel reads it, in bf16: for each block
    of 16 output columns and each pair of input columns, the 16 value then the 16 gate weights of both
    input columns, (d / 16, k / 2, 32, 2). d must be a multiple of 16 and k even."""
    if w.ndim != 2 or w.shape[0] % 32 or w.shape[1] % 2:
        raise ValueError("linear_geglu_weight: want a (2d, k) weight with d a multiple of 16 and k even, got "
                         f"{tuple(w.shape)}")
    d, k = w.shape[0] // 2, w.shape[1]
    halves = w.detach().to(device="cpu", dtype=torch.bfloat16).view(2, d // 16, 16, k // 2, 2)
    return halves.permute(1, 3, 0, 2, 4).reshape(d // 16, k // 2, 32, 2).contiguous()


def cpu_linear_geglu_supports(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when ``cpu_linear_geglu(x, wp, bias)`` computes this call, else why not."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.ndim < 1:
        return f"want a bf16 CPU input, got {x.dtype} on {x.device}"
    k = x.shape[-1]
    if wp.dtype != torch.bfloat16 or wp.ndim != 4 or wp.shape[1:] != (k // 2, 32, 2) or k % 2 or not wp.is_contiguous():
        return (f"want an even input width ({k}) and a contiguous bf16 (d / 16, {k // 2}, 32, 2) packed weight, got "
                f"{tuple(wp.shape)} {wp.dtype}")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (32 * wp.shape[0],)
                             or not bias.is_contiguous()):
        return f"want a contiguous bf16 bias of {32 * wp.shape[0]} values, got {tuple(bias.shape)} {bias.dtype}"
    if torch.is_grad_enabled() and x.requires_grad:
        return "the CPU kernel is forward-only and the input requires grad"
    return cpu_linear_geglu_ready()


def linear_geglu_launch(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel without ``cpu_linear_geglu_supports``: for a caller that packed ``wp`` and ``bias`` from
    the module itself and checked ``x`` (optim/geglu.py, once per call)."""
    d, k = 16 * wp.shape[0], x.shape[-1]
    xc = x.contiguous()
    out = x.new_empty(*x.shape[:-1], d)
    rows = xc.numel() // k if k else 0
    if rows:
        with cpu_build.profiled("kernels::cpu_linear_geglu"):
            _state["dr_linear_geglu_bf16"](xc.data_ptr(), wp.data_ptr(), None if bias is None else bias.data_ptr(),
                                           out.data_ptr(), rows, k, d, torch.get_num_threads())
    return out


def cpu_linear_geglu(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``value * gelu(gate)`` of the linear with packed weight ``wp``; see the module docstring."""
    why = cpu_linear_geglu_supports(x, wp, bias)
    if why is not None:
        raise ValueError(f"cpu_linear_geglu: {why}")
    return linear_geglu_launch(x, wp, bias)
