"""The limit's FLOP count against closed forms: matmul 2mnk, and attention, whose CPU kernel torch leaves uncounted."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.ceiling import count_flops, limit_figures


def test_matmul_counts_two_flops_per_multiply_add():
    a, b = torch.randn(33, 17), torch.randn(17, 9)
    assert count_flops(lambda: a @ b) == 2 * 33 * 17 * 9


def test_cpu_attention_is_counted_like_two_matmuls():
    q = torch.randn(2, 3, 40, 16)  # (B, H, T, D)
    k, v = torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 8)
    expected = 2 * 2 * 3 * 40 * 24 * 16 + 2 * 2 * 3 * 40 * 24 * 8
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == expected
    # the math path (decomposed into matmuls) agrees with the fused kernel's formula
    q64, k64, v64 = (t.double() for t in (q, k, v))
    math_path = count_flops(lambda: torch.softmax(q64 @ k64.transpose(-1, -2) / 4.0, -1) @ v64)
    assert math_path == expected


def test_limit_fractions():
    fig = limit_figures(10**9, 0.01, {"fp32_gflops": 200.0, "bf16_gflops": 800.0})
    assert fig == {"achieved_gflops": 100.0, "fraction_of_fp32_peak": 0.5, "fraction_of_bf16_peak": 0.125}
    assert limit_figures(None, 0.01, None)["achieved_gflops"] is None
