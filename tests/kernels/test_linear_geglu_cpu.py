"""Our bf16 linear+GEGLU CPU kernel (kernels/linear_geglu_cpu.c) against the same function in fp64.

Budget: one bf16 rounding of the exact result (2^-8 relative) plus a floor for the fp32 sums' own
rounding (k products summed in another order: 2^-20 of the sum of |x w|) and for the GELU's far tail
(1e-6, as tests/kernels/test_geglu_cpu.py); and never worse than the unfused bf16 path (the
projection rounded to bf16, then the activation kernel), which rounds twice.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.geglu_cpu import cpu_geglu
from kernels.linear_geglu_cpu import (cpu_linear_geglu, cpu_linear_geglu_ready, cpu_linear_geglu_supports,
                                      linear_geglu_weight)

needs_kernel = pytest.mark.skipif(cpu_linear_geglu_ready() is not None,
                                  reason=f"CPU kernel: {cpu_linear_geglu_ready()}")


def inputs(rows_shape, k, d, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(2 * d, k, generator=g) * 2 / k ** 0.5).to(torch.bfloat16)
    b = (torch.randn(2 * d, generator=g) * 0.5).to(torch.bfloat16) if bias else None
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
    with pytest.raises(ValueError, match=r"k even"):
        linear_geglu_weight(torch.zeros(64, 3))


@pytest.mark.parametrize("case, match", [
    ("fp32 input", "bf16 CPU input"),
    ("wrong width", "packed weight"),
    ("short bias", "bias of 64 values"),
])
def test_unsupported_calls_say_why(case, match):
    x, w, b = inputs((3,), 8, 32)
    wp = linear_geglu_weight(w)
    if case == "fp32 input":
        x = x.float()
    elif case == "wrong width":
        x = torch.zeros(3, 10, dtype=torch.bfloat16)
    else:
        b = b[:60]
    why = cpu_linear_geglu_supports(x, wp, b)
    assert why is not None and match in why
    with pytest.raises(ValueError, match=match):
        cpu_linear_geglu(x, wp, b)
