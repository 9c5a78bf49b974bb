"""A 3x3 convolution as Winograd F(2x2, 3x3) for bf16 CPU tensors (C kernel: winograd_cpu.c).

A direct 3x3 convolution makes 36 multiply-adds per input and output channel pair for each 2x2
block of outputs; Winograd's minimal filtering makes 16: the input's 4x4 window around the block
and the kernel are each transformed into 16 numbers, multiplied position by position (summed over
input channels: 16 independent matmuls, on vdpbf16ps with fp32 sums) and the 16 sums transformed
back into the 2x2 block. On this CPU the direct bf16 convolutions already run at the matmul units'
rate, so this is the way to fewer seconds: 2.25x fewer multiplies for two transforms that cost
little (measured faster than oneDNN's direct convolution: bench/RESULTS.md, session 14, 'Winograd
F(2x2, 3x3) convolutions'; the range first written here: 'Figures moved from docstrings').

``winograd_weight(w)`` is the transformed kernel, computed from ``w`` once (in C, fp32), rounded to
bf16 and packed for the kernel (16/9 the size of ``w``). ``cpu_winograd_conv3x3(x, u, bias)`` is
``conv2d(x, w, bias, padding=1)`` for a channels-last or contiguous bf16 (N, C, H, W) input; the
result is channels-last, like oneDNN's. The transformed input and kernel are rounded to bf16 where
the direct bf16 convolution rounds only its output, so its error against fp32 is larger than the
direct one's in rms and in max (measured: bench/RESULTS.md, session 14, as above, and 'Figures moved
from docstrings'; tests/kernels/test_winograd_cpu.py holds it to a budget).
``cpu_winograd_ready()`` says why the kernel cannot run here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("winograd_cpu.c")

_state: dict = {}
BLOCK = 8  # WR in winograd_cpu.c: tiles per block of the products
GROUP = 64  # tiles per task: each pass over the kernel's weights serves this many tiles


def cpu_winograd_ready() -> str | None:
    """None when the transform kernels run on this machine (building them on first call), else why not."""
    return cpu_build.bind(_state, SOURCE)  # entry points: winograd_cpu.h


def winograd_weight(w: torch.Tensor, up2: bool = False) -> torch.Tensor:
    """The transformed kernel ``G w G^T`` of a bf16 (C_out, C_in, 3, 3) weight, computed in fp32 (its
    rounding far below bf16's), rounded to bf16 and packed for the products kernel: by blocks of 32
    output channels, in pairs of input channels (vdpbf16ps multiplies pairs): (C_out / 32, 16, C_in / 2,
    32, 2); ``up2``: only the 9 positions ``cpu_winograd_up2_conv3x3`` multiplies (after nearest doubling,
    row and column 2 of every transformed window are zero: positions 4a + b, a and b in {0, 1, 3}),
    (C_out / 32, 9, C_in / 2, 32, 2). In C: SD 1.5's biggest kernel takes far less time than with torch ops
    (measured: bench/RESULTS.md, 'Figures moved from docstrings', and session 14's paragraph on the first
    call after ``optimize``)."""
    if w.ndim != 4 or tuple(w.shape[2:]) != (3, 3) or w.shape[1] % 2 or w.shape[0] % 32:
        raise ValueError("winograd_weight: want a (C_out, C_in, 3, 3) weight with C_in even and C_out a multiple "
                         f"of 32, got {tuple(w.shape)}")
    why = cpu_winograd_ready()
    if why is not None:
        raise ValueError(f"winograd_weight: {why}")
    co, ci = w.shape[:2]
    src = w.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    u = torch.empty(co // 32, 9 if up2 else 16, ci // 2, 32, 2, dtype=torch.bfloat16)
    _state["dr_winograd_weight_bf16"](src.data_ptr(), u.data_ptr(), co, ci, int(up2), torch.get_num_threads())
    return u


def work_split(tiles: int, col_blocks: int, threads: int) -> tuple[int, int]:
    """(tiles per task, parts the output channels are split into): GROUP tiles per task where there
    are enough tiles for every thread; fewer tiles and split channels where there are not."""
    group = min(GROUP, -(-tiles // threads // BLOCK) * BLOCK or BLOCK)
    groups = -(-tiles // group)
    return group, max(1, min(col_blocks, -(-threads // groups)))


def cpu_winograd_supports(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
                          up2: bool = False) -> str | None:
    """None when ``cpu_winograd_conv3x3`` (``up2``: ``cpu_winograd_up2_conv3x3``) computes this call,
    else why not."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.ndim != 4:
        return f"want a 4-D bf16 CPU input, got {x.ndim}-D {x.dtype} on {x.device}"
    positions = 9 if up2 else 16
    if (u.dtype != torch.bfloat16 or u.ndim != 5 or u.shape[1:] != (positions, x.shape[1] // 2, 32, 2)
            or x.shape[1] % 2 or not u.is_contiguous()):
        return (f"want an even channel count ({x.shape[1]}) and a contiguous bf16 (C_out / 32, {positions}, "
                f"{x.shape[1] // 2}, 32, 2) transformed weight, got {tuple(u.shape)} {u.dtype}")
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (32 * u.shape[0],)
                             or not bias.is_contiguous()):
        return f"want a contiguous bf16 bias of {32 * u.shape[0]} values, got {tuple(bias.shape)} {bias.dtype}"
    if x.numel() == 0:
        return "empty input"
    return cpu_winograd_ready()


def residual_layout(residual: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """``residual`` as the kernels add it: channels-last, in the output's shape and dtype (else an error)."""
    if residual is None:
        return None
    if tuple(residual.shape) != tuple(shape) or residual.dtype != dtype or residual.device.type != "cpu":
        raise ValueError(f"residual: want a {dtype} CPU tensor of shape {tuple(shape)}, got {residual.dtype} "
                         f"{tuple(residual.shape)} on {residual.device}")
    return residual.contiguous(memory_format=torch.channels_last)


def winograd_launch(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, up2: bool,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel without ``cpu_winograd_supports``: for a caller that made ``u`` and ``bias`` from the
    conv itself and checked ``x`` (runtime/optim/winograd.py, once per call). ``residual`` (not with ``up2``):
    a tensor of the output's shape added before the rounding, as a ResNet block adds its input."""
    name = "cpu_winograd_up2_conv3x3" if up2 else "cpu_winograd_conv3x3"
    n, c, h, w = x.shape
    co = 32 * u.shape[0]
    xl = x.contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    tiles = n * h * w if up2 else n * ((h + 1) // 2) * ((w + 1) // 2)
    group, col_parts = work_split(tiles, co // 32, threads)
    scale = 2 if up2 else 1
    if up2 and residual is not None:
        raise ValueError("cpu_winograd_up2_conv3x3: no residual")
    res = residual_layout(residual, (n, co, h, w), torch.bfloat16)
    with cpu_build.profiled(f"diffusion_runtime::{name}"):
        scratch = torch.empty(threads * 16 * group * c, dtype=torch.bfloat16)
        y = torch.empty(n, co, scale * h, scale * w, dtype=torch.bfloat16, memory_format=torch.channels_last)
        pointers = [xl.data_ptr(), u.data_ptr(), None if bias is None else bias.data_ptr()]
        if not up2:
            pointers.append(None if res is None else res.data_ptr())
        _state[f"dr_{name[4:]}_bf16"](*pointers, y.data_ptr(), scratch.data_ptr(), n, h, w, c, co, group, col_parts,
                                      threads)
    return y


def _checked(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, up2: bool) -> torch.Tensor:
    why = cpu_winograd_supports(x, u, bias, up2)
    if why is not None:
        raise ValueError(f"{'cpu_winograd_up2_conv3x3' if up2 else 'cpu_winograd_conv3x3'}: {why}")
    return winograd_launch(x, u, bias, up2)


def cpu_winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` with ``u = winograd_weight(w)``; see the module docstring."""
    return _checked(x, u, bias, up2=False)


def cpu_winograd_up2_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), w, bias, padding=1)`` with
    ``u = winograd_weight(w, up2=True)``: one 2x2 output block per input pixel, 9 multiply-adds per
    input pixel and channel pair (folding the doubling into a 2x2 kernel takes 16, the plain
    convolution of the doubled map 36). The result (N, C_out, 2H, 2W) is channels-last."""
    return _checked(x, u, bias, up2=True)
