"""The GEGLU feed-forward's projection and activation in one CPU kernel, bf16 or fp32 (C: linear_geglu_cpu.c,
linear_geglu_f32_cpu.c).

``cpu_linear_geglu(x, wp, bias)`` is ``value * gelu(gate)`` of ``value, gate = linear(x, w, bias).chunk(2, -1)``
with ``wp = linear_geglu_weight(w)``: the products with fp32 sums (vdpbf16ps in bf16, FMAs in fp32), the bias
and the exact GELU on those sums, and the (rows, 2d) projection never written. In bf16 the unfused path
(oneDNN's linear, then the GEGLU kernel) rounds the projection to bf16 first: this one is closer to fp32
(tests/kernels/test_linear_geglu_cpu.py) and faster on the SD UNets' shapes (measured: bench/RESULTS.md,
session 16, 'The feed-forward's projection and GEGLU in one kernel; AMX and AVX-512-only CPUs'; the range
first written here: 'Figures moved from docstrings'). In
fp32 it differs from eager by the order of the sums. The bf16 kernel needs AVX512-BF16, the fp32 one
AVX-512; ``cpu_linear_geglu_ready(dtype)`` says why one cannot run here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCES = {torch.bfloat16: Path(__file__).with_name("linear_geglu_cpu.c"),
           torch.float32: Path(__file__).with_name("linear_geglu_f32_cpu.c")}
_ENTRY = {torch.bfloat16: "dr_linear_geglu_bf16", torch.float32: "dr_linear_geglu_f32"}

_states: dict = {torch.bfloat16: {}, torch.float32: {}}


def cpu_linear_geglu_ready(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when the kernel for ``dtype`` (bf16 or fp32) runs on this machine (building it on first call), else
    why not."""
    if dtype not in SOURCES:
        return f"the kernel is for bf16 or fp32, not {dtype}"
    return cpu_build.bind(_states[dtype], SOURCES[dtype])  # entry points: linear_geglu_cpu.h, linear_geglu_f32_cpu.h


def _packed_shape(d: int, k: int, dtype: torch.dtype) -> tuple[int, ...]:
    return (d // 16, k // 2, 32, 2) if dtype == torch.bfloat16 else (d // 16, k, 32)


def linear_geglu_weight(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A (2d, k) linear weight (value rows, then gate rows) as the ``dtype`` kernel reads it: for each block of
    16 output columns and each input column (a pair of them in bf16, which vdpbf16ps multiplies together),
    the 16 value then the 16 gate weights: (d / 16, k / 2, 32, 2) in bf16, (d / 16, k, 32) in fp32. d must
    be a multiple of 16 and, in bf16, k even."""
    if dtype not in SOURCES:
        raise ValueError(f"linear_geglu_weight: dtype must be bf16 or fp32, got {dtype}")
    if w.ndim != 2 or w.shape[0] % 32 or (dtype == torch.bfloat16 and w.shape[1] % 2):
        raise ValueError("linear_geglu_weight: want a (2d, k) weight with d a multiple of 16 (and k even in bf16), "
                         f"got {tuple(w.shape)}")
    d, k = w.shape[0] // 2, w.shape[1]
    src = w.detach().to(device="cpu", dtype=dtype)
    if dtype == torch.bfloat16:
        return src.view(2, d // 16, 16, k // 2, 2).permute(1, 3, 0, 2, 4).reshape(_packed_shape(d, k, dtype)).contiguous()
    return src.view(2, d // 16, 16, k).permute(1, 3, 0, 2).reshape(_packed_shape(d, k, dtype)).contiguous()


def cpu_linear_geglu_supports(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when ``cpu_linear_geglu(x, wp, bias)`` computes this call, else why not."""
    if x.dtype not in SOURCES or x.device.type != "cpu" or x.ndim < 1:
        return f"want a bf16 or fp32 CPU input, got {x.dtype} on {x.device}"
    k, name = x.shape[-1], "bf16" if x.dtype == torch.bfloat16 else "fp32"
    want = _packed_shape(16 * wp.shape[0], k, x.dtype) if wp.ndim else ()
    if (wp.dtype != x.dtype or tuple(wp.shape) != want or not wp.is_contiguous()
            or (x.dtype == torch.bfloat16 and k % 2)):
        what = f"an even input width ({k}) and " if x.dtype == torch.bfloat16 else ""
        return (f"want {what}a contiguous {name} {('(d / 16, %d, 32, 2)' if name == 'bf16' else '(d / 16, %d, 32)') % want[1]} "
                f"packed weight, got {tuple(wp.shape)} {wp.dtype}")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (32 * wp.shape[0],) or not bias.is_contiguous()):
        return f"want a contiguous {name} bias of {32 * wp.shape[0]} values, got {tuple(bias.shape)} {bias.dtype}"
    if torch.is_grad_enabled() and x.requires_grad:
        return "the CPU kernel is forward-only and the input requires grad"
    return cpu_linear_geglu_ready(x.dtype)


def low_rank_weight(up: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A low-rank term's (2d, r) up weight packed as ``linear_geglu_weight`` packs the projection's, its rank
    zero-padded to even in bf16: ``cpu_linear_geglu(x, wp, bias, low=(h, hw))`` adds ``h @ up.T`` to the
    projection before the activation (a LoRA adapter's term, h its down product)."""
    if dtype == torch.bfloat16 and up.ndim == 2 and up.shape[1] % 2:
        up = torch.cat([up, up.new_zeros(up.shape[0], 1)], dim=1)
    return linear_geglu_weight(up, dtype)


def low_rank_input(h: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """``h`` (rows, r) as the kernel reads it beside ``hw = low_rank_weight(up)``: contiguous, zero-padded to
    hw's rank."""
    r = hw.shape[1] * (2 if hw.ndim == 4 else 1)
    h = h.reshape(-1, h.shape[-1])
    if h.shape[1] != r:
        h = torch.cat([h, h.new_zeros(h.shape[0], r - h.shape[1])], dim=1)
    return h.contiguous()


def linear_geglu_launch(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None,
                        low: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The kernel without ``cpu_linear_geglu_supports``: for a caller that packed ``wp`` and ``bias`` from
    the module itself and checked ``x`` (runtime/optim/geglu.py, once per call). ``low``: ``(h, hw)``, a
    low-rank term (``low_rank_weight``, ``low_rank_input``: h's rows are x's)."""
    d, k = 16 * wp.shape[0], x.shape[-1]
    xc = x.contiguous()
    out = x.new_empty(*x.shape[:-1], d)
    rows = xc.numel() // k if k else 0
    h, hw = (None, None) if low is None else low
    r = 0 if h is None else h.shape[-1]
    if rows:
        with cpu_build.profiled("diffusion_runtime::cpu_linear_geglu"):
            _states[x.dtype][_ENTRY[x.dtype]](xc.data_ptr(), wp.data_ptr(), None if bias is None else bias.data_ptr(),
                                              out.data_ptr(), rows, k, d, None if h is None else h.data_ptr(),
                                              None if hw is None else hw.data_ptr(), r, torch.get_num_threads())
    return out


def cpu_linear_geglu(x: torch.Tensor, wp: torch.Tensor, bias: torch.Tensor | None,
                     low: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``value * gelu(gate)`` of the linear with packed weight ``wp`` (plus ``h @ up.T`` with ``low = (h,
    low_rank_weight(up))``); see the module docstring."""
    why = cpu_linear_geglu_supports(x, wp, bias)
    if why is None and low is not None:
        h, hw = low
        r = h.shape[-1]
        want = _packed_shape(16 * wp.shape[0], r, x.dtype)
        if (h.dtype != x.dtype or hw.dtype != x.dtype or tuple(hw.shape) != want or not hw.is_contiguous()
                or not h.is_contiguous() or h.numel() != x.numel() // x.shape[-1] * r or (x.dtype == torch.bfloat16 and r % 2)):
            why = (f"want a contiguous low-rank input of {x.numel() // x.shape[-1]} rows and an even rank in bf16, with "
                   f"its weight packed {want}; got h {tuple(h.shape)} {h.dtype}, weight {tuple(hw.shape)} {hw.dtype}")
    if why is not None:
        raise ValueError(f"cpu_linear_geglu: {why}")
    return linear_geglu_launch(x, wp, bias, low)
