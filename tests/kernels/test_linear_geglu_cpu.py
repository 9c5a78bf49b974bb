"""Our linear+GEGLU CPU kernels (runtime/kernels/linear_geglu_cpu.c in bf16, linear_geglu_f32_cpu.c in fp32) against
the same function in fp64.

Budget in bf16: one bf16 rounding of the exact result (2^-8 relative) plus a floor for the fp32 sums' own
rounding (k products summed in another order: 2^-20 of the sum of |x w|) and for the GELU's far tail
(1e-6, as tests/kernels/test_geglu_cpu.py); and never worse than the unfused bf16 path (the
projection rounded to bf16, then the activation kernel), which rounds twice. In fp32: the sums' floor and
2^-20 relative, and within 2x of eager fp32's own error.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.geglu_cpu import cpu_geglu
from runtime.kernels.linear_geglu_cpu import (cpu_linear_geglu, cpu_linear_geglu_ready, cpu_linear_geglu_supports,
                                      linear_geglu_weight, low_rank_input, low_rank_weight)

needs_kernel = pytest.mark.skipif(cpu_linear_geglu_ready() is not None,
                                  reason=f"CPU kernel: {cpu_linear_geglu_ready()}")
needs_f32_kernel = pytest.mark.skipif(cpu_linear_geglu_ready(torch.float32) is not None,
                                      reason=f"CPU kernel: {cpu_linear_geglu_ready(torch.float32)}")


def inputs(rows_shape, k, d, bias=True, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, k, generator=g).to(dtype)
    w = (torch.randn(2 * d, k, generator=g) * 2 / k ** 0.5).to(dtype)
    b = (torch.randn(2 * d, generator=g) * 0.5).to(dtype) if bias else None
    return x, w, b


def reference(x, w, b):
    proj = F.linear(x.double(), w.double(), None if b is None else b.double())
    value, gate = proj.chunk(2, dim=-1)
    return value * 0.5 * gate * (1 + torch.erf(gate / 2 ** 0.5))


def budget(x, w, b, ref):
    sums = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    value_scale, gate_scale = sums.chunk(2, dim=-1)
    return ref.abs() * 2.0 ** -8 + (value_scale + gate_scale) * 2.0 ** -20 + 1e-6


@needs_kernel
@pytest.mark.parametrize("rows_shape, k, d", [((2, 1024), 128, 512), ((2, 256), 256, 1024), ((2, 64), 512, 2048),
                                               ((2, 77), 40, 16), ((13,), 2, 48), ((1,), 320, 32), ((3, 5, 7), 64, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64_within_one_bf16_rounding(rows_shape, k, d, bias):
    x, w, b = inputs(rows_shape, k, d, bias)
    out, ref = cpu_linear_geglu(x, linear_geglu_weight(w), b), reference(x, w, b)
    assert out.shape == (*rows_shape, d) and out.dtype == torch.bfloat16
    err = (out.double() - ref).abs()
    assert (err <= budget(x, w, b, ref)).all()
    unfused = cpu_geglu(F.linear(x, w, b)).double()
    assert err.max() <= (unfused - ref).abs().max()


@needs_f32_kernel
@pytest.mark.parametrize("rows_shape, k, d", [((2, 1024), 128, 512), ((2, 64), 512, 2048), ((2, 77), 40, 16),
                                               ((13,), 3, 48), ((1,), 320, 32), ((3, 5, 7), 64, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_fp64_as_closely_as_eager(rows_shape, k, d, bias):
    x, w, b = inputs(rows_shape, k, d, bias, dtype=torch.float32)
    wp = linear_geglu_weight(w, torch.float32)
    assert wp.shape == (d // 16, k, 32) and wp.dtype == torch.float32
    out, ref = cpu_linear_geglu(x, wp, b), reference(x, w, b)
    assert out.shape == (*rows_shape, d) and out.dtype == torch.float32
    err = (out.double() - ref).abs()
    sums = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert (err <= ref.abs() * 2.0 ** -20 + sum(sums.chunk(2, dim=-1)) * 2.0 ** -20 + 1e-7).all()
    value, gate = F.linear(x, w, b).chunk(2, dim=-1)
    eager = (value * F.gelu(gate)).double()
    assert err.max() <= 2 * (eager - ref).abs().max() + 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows_shape, k, d, r", [((2, 256), 128, 512, 8), ((2, 77), 64, 48, 5), ((9,), 40, 16, 16)])
def test_a_low_rank_term_inside_the_sums(dtype, rows_shape, k, d, r):
    """``low=(h, hw)`` adds ``h @ up.T`` to the projection before the activation (a LoRA adapter's term), as
    the kernel on ``[x, h]`` against ``[w, up]`` computes it: within the fp64 budget, and in bf16 the same
    bits (the same running sums; fp32 sums h's columns as a chunk of their own)."""
    why = cpu_linear_geglu_ready(dtype)
    if why is not None:
        pytest.skip(f"CPU kernel: {why}")
    x, w, b = inputs(rows_shape, k, d, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(*rows_shape, r, generator=g).to(dtype)
    up = (torch.randn(2 * d, r, generator=g) / r).to(dtype)
    hw = low_rank_weight(up, dtype)
    out = cpu_linear_geglu(x, linear_geglu_weight(w, dtype), b, low=(low_rank_input(h, hw), hw))
    r2 = hw.shape[1] * 2 if dtype == torch.bfloat16 else r
    pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-1], r2 - r)], dim=-1)
    xh, wu = torch.cat([x, pad(h)], dim=-1), torch.cat([w, pad(up)], dim=1)
    if dtype == torch.bfloat16:
        assert torch.equal(out, cpu_linear_geglu(xh, linear_geglu_weight(wu, dtype), b))
    ref = reference(xh, wu, b)
    err = (out.double() - ref).abs()
    if dtype == torch.bfloat16:
        assert (err <= budget(xh, wu, b, ref)).all()
    else:
        sums = F.linear(xh.double().abs(), wu.double().abs(), b.double().abs())
        assert (err <= ref.abs() * 2.0 ** -20 + sum(sums.chunk(2, dim=-1)) * 2.0 ** -20 + 1e-7).all()
    with pytest.raises(ValueError, match="low-rank input"):
        cpu_linear_geglu(x, linear_geglu_weight(w, dtype), b, low=(h.reshape(-1, r)[1:], hw))


@needs_kernel
def test_thread_count_does_not_change_bits():
    x, w, b = inputs((3, 37), 96, 80)
    wp = linear_geglu_weight(w)
    out = cpu_linear_geglu(x, wp, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_linear_geglu(x, wp, b), out)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_a_row_slice_input_is_read_as_its_values():
    x, w, b = inputs((4, 30), 64, 32)
    wp = linear_geglu_weight(w)
    strided = x[:, ::2]  # not contiguous: copied first
    assert torch.equal(cpu_linear_geglu(strided, wp, b), cpu_linear_geglu(strided.contiguous(), wp, b))


def test_packed_weight_layout():
    w = torch.arange(64 * 4, dtype=torch.float32).view(64, 4).to(torch.bfloat16)
    wp = linear_geglu_weight(w)
    assert wp.shape == (2, 2, 32, 2)
    # block 1, pair 0: value rows 16..31, then gate rows 48..63, input columns 0 and 1
    assert torch.equal(wp[1, 0, :16], w[16:32, 0:2]) and torch.equal(wp[1, 0, 16:], w[48:64, 0:2])
    with pytest.raises(ValueError, match=r"\(2d, k\) weight"):
        linear_geglu_weight(torch.zeros(48, 4))
    with pytest.raises(ValueError, match=r"k even in bf16"):
        linear_geglu_weight(torch.zeros(64, 3))
    assert linear_geglu_weight(torch.zeros(64, 3), torch.float32).shape == (2, 3, 32)  # fp32 takes odd widths
    w32 = torch.arange(64 * 3, dtype=torch.float32).view(64, 3)
    # fp32: block 1, input column 2: value rows 16..31, then gate rows 48..63
    assert torch.equal(linear_geglu_weight(w32, torch.float32)[1, 2], torch.cat([w32[16:32, 2], w32[48:64, 2]]))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        linear_geglu_weight(w32, torch.float16)


@pytest.mark.parametrize("case, match", [
    ("fp32 input", "a contiguous fp32"),
    ("fp16 input", "bf16 or fp32 CPU input"),
    ("wrong width", "packed weight"),
    ("short bias", "bias of 64 values"),
])
def test_unsupported_calls_say_why(case, match):
    x, w, b = inputs((3,), 8, 32)
    wp = linear_geglu_weight(w)
    if case == "fp32 input":
        x = x.float()
    elif case == "fp16 input":
        x = x.half()
    elif case == "wrong width":
        x = torch.zeros(3, 10, dtype=torch.bfloat16)
    else:
        b = b[:60]
    why = cpu_linear_geglu_supports(x, wp, b)
    assert why is not None and match in why
    with pytest.raises(ValueError, match=match):
        cpu_linear_geglu(x, wp, b)
