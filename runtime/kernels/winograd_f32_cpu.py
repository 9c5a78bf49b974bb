"""Winograd F(2x2, 3x3) for fp32 CPU tensors (C kernel: winograd_f32_cpu.c), the sibling of winograd_cpu.py.

The same algorithm and task layout as the bf16 kernel, with every number fp32: the transformed input
and kernel are not rounded, the products are FMAs. On this CPU eager fp32 convolutions run at the
fp32 matmul rate, so 2.25x fewer multiplies are fewer seconds per convolution too (measured:
bench/RESULTS.md, session 15, 'Winograd in fp32, and the pass at level 1'; the range first written here:
'Figures moved from docstrings'), and the result is closer to fp64 than the direct convolution's (its
transforms are exact in binary: halves and sums). ``winograd_weight_f32(w)`` is ``G w G^T`` packed for
the kernel, (C_out / 32, 16, C_in, 32), 16/9 the size of ``w``; ``cpu_winograd_conv3x3_f32(x, u, bias)`` is
``conv2d(x, w, bias, padding=1)`` for an (N, C, H, W) fp32 input, its result channels-last. Needs AVX-512
(F, BW, VL), not its bf16 extension: it is built without it and runs on CPUs without native bf16, where
levels 1 and 2 compute in fp32. On CPUs without AVX-512 its AVX2 sibling (winograd_f32_avx2_cpu.c: same
entry points, packed kernel and sums) runs instead; ``variant(source)`` pins one of the two (tests).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import cpu_build
from .winograd_cpu import residual_layout, work_split

SOURCE = Path(__file__).with_name("winograd_f32_cpu.c")
AVX2_SOURCE = Path(__file__).with_name("winograd_f32_avx2_cpu.c")
SOURCES = (SOURCE, AVX2_SOURCE)  # the first this CPU runs is bound

_state: dict = {}


def cpu_winograd_f32_ready() -> str | None:
    """None when the fp32 kernels run on this machine (building them on first call), else why not."""
    return cpu_build.bind_first(_state, SOURCES)  # entry points: winograd_f32_cpu.h, winograd_f32_avx2_cpu.h


def bound_source() -> Path | None:
    """Which of SOURCES the kernels run from (None: neither runs here)."""
    if cpu_winograd_f32_ready() is not None:
        return None
    return _state.get("source")


@contextlib.contextmanager
def variant(source: Path):
    """Run the kernels from ``source`` (one of SOURCES) inside the block, whatever this CPU prefers (tests:
    the AVX2 sibling on an AVX-512 host). Yields why it cannot run here, or None."""
    global _state
    before = _state
    _state = {}
    try:
        yield cpu_build.bind_first(_state, (source,))
    finally:
        _state = before


def winograd_weight_f32(w: torch.Tensor) -> torch.Tensor:
    """``G w G^T`` of a (C_out, C_in, 3, 3) weight in fp32, packed by blocks of 32 output channels:
    (C_out / 32, 16, C_in, 32)."""
    if w.ndim != 4 or tuple(w.shape[2:]) != (3, 3) or w.shape[0] % 32:
        raise ValueError("winograd_weight_f32: want a (C_out, C_in, 3, 3) weight with C_out a multiple of 32, "
                         f"got {tuple(w.shape)}")
    why = cpu_winograd_f32_ready()
    if why is not None:
        raise ValueError(f"winograd_weight_f32: {why}")
    co, ci = w.shape[:2]
    src = w.detach().to(device="cpu", dtype=torch.float32).contiguous()
    u = torch.empty(co // 32, 16, ci, 32)
    _state["dr_winograd_weight_f32"](src.data_ptr(), u.data_ptr(), co, ci, torch.get_num_threads())
    return u


def cpu_winograd_f32_supports(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when ``cpu_winograd_conv3x3_f32(x, u, bias)`` computes this call, else why not."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 4:
        return f"want a 4-D fp32 CPU input, got {x.ndim}-D {x.dtype} on {x.device}"
    if u.dtype != torch.float32 or u.ndim != 4 or u.shape[1:] != (16, x.shape[1], 32) or not u.is_contiguous():
        return (f"want a contiguous fp32 (C_out / 32, 16, {x.shape[1]}, 32) transformed weight, got "
                f"{tuple(u.shape)} {u.dtype}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (32 * u.shape[0],) or not bias.is_contiguous()):
        return f"want a contiguous fp32 bias of {32 * u.shape[0]} values, got {tuple(bias.shape)} {bias.dtype}"
    if x.numel() == 0:
        return "empty input"
    return cpu_winograd_f32_ready()


def winograd_launch_f32(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel without the checks, for a caller that made ``u`` and ``bias`` from the conv itself.
    ``residual``: a tensor of the output's shape added to it (the same sum, bit for bit, as adding after)."""
    n, c, h, w = x.shape
    co = 32 * u.shape[0]
    xl = x.contiguous(memory_format=torch.channels_last)
    res = residual_layout(residual, (n, co, h, w), torch.float32)
    threads = torch.get_num_threads()
    group, col_parts = work_split(n * ((h + 1) // 2) * ((w + 1) // 2), co // 32, threads)
    with cpu_build.profiled("diffusion_runtime::cpu_winograd_conv3x3_f32"):
        scratch = torch.empty(threads * 16 * group * c)
        y = torch.empty(n, co, h, w, memory_format=torch.channels_last)
        _state["dr_winograd_conv3x3_f32"](xl.data_ptr(), u.data_ptr(), None if bias is None else bias.data_ptr(),
                                          None if res is None else res.data_ptr(), y.data_ptr(), scratch.data_ptr(),
                                          n, h, w, c, co, group, col_parts, threads)
    return y


def cpu_winograd_conv3x3_f32(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` with ``u = winograd_weight_f32(w)``; see the module docstring."""
    why = cpu_winograd_f32_supports(x, u, bias)
    if why is not None:
        raise ValueError(f"cpu_winograd_conv3x3_f32: {why}")
    return winograd_launch_f32(x, u, bias)
