"""The LoRA term kernel (runtime/kernels/lora_cpu.c, bf16) against the same sum in fp64.

``out + s * U (D x)``: the kernel rounds the (rows, r) down product to bf16, as the two-matmul path does, and
the result once. Budget per output: one bf16 rounding of the exact result (2^-8 relative), the down
product's rounding carried through the up product (2^-8 of s * sum_j |h_j U_cj|), and a floor for the fp32
sums' own order (2^-20 of the absolute products). It must also be no worse than twice the two-matmul path's
error (torch's bf16 mm, then addmm_), on the same inputs.
"""
from __future__ import annotations

import pytest
import torch

from runtime.kernels.lora_cpu import (MAX_RANK, cpu_lora_term_, cpu_lora_term_ready, cpu_lora_term_supports,
                                      lora_kernel_weights, row_stride)

needs_kernel = pytest.mark.skipif(cpu_lora_term_ready() is not None, reason=f"CPU kernel: {cpu_lora_term_ready()}")
needs_f32_kernel = pytest.mark.skipif(cpu_lora_term_ready(torch.float32) is not None,
                                      reason=f"CPU kernel: {cpu_lora_term_ready(torch.float32)}")


def inputs(m, k, r, n, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    down = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    up = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    out = torch.randn(m, n, generator=g).to(dtype)
    return x, down, up, out


def reference(x, down, up, out, scale):
    h = x.double() @ down.double().t()
    return out.double() + scale * h @ up.double().t(), h


def budget(x, down, up, ref, h, scale):
    through = abs(scale) * h.abs() @ up.double().abs().t()
    floor = abs(scale) * (x.double().abs() @ down.double().abs().t()) @ up.double().abs().t()
    return ref.abs() * 2.0 ** -8 + through * 2.0 ** -8 + floor * 2.0 ** -20 + 1e-30


@needs_kernel
@pytest.mark.parametrize("m, k, r, n", [(2048, 128, 8, 128), (512, 256, 8, 2048), (154, 512, 8, 320), (7, 40, 5, 33),
                                        (1, 64, 8, 16), (3, 33, 16, 48), (37, 96, 24, 200), (64, 320, 64, 320),
                                        (9, 128, 128, 96)])
@pytest.mark.parametrize("scale", [1.0, 0.35, -2.0])
def test_matches_fp64(m, k, r, n, scale):
    x, down, up, out = inputs(m, k, r, n)
    ref, h = reference(x, down, up, out, scale)
    got = out.clone()
    cpu_lora_term_(got, x, *lora_kernel_weights(down, up), scale)
    err = (got.double() - ref).abs()
    assert (err <= budget(x, down, up, ref, h, scale)).all()
    two = out.clone().addmm_(x @ down.t(), up.t(), alpha=scale)
    assert err.max() <= 2 * (two.double() - ref).abs().max() + 1e-30


@needs_f32_kernel
@pytest.mark.parametrize("m, k, r, n", [(2048, 128, 8, 128), (154, 512, 8, 320), (7, 40, 5, 33), (3, 33, 16, 48),
                                        (37, 96, 24, 200), (9, 128, 128, 96)])
@pytest.mark.parametrize("scale", [1.0, -0.6])
def test_fp32_matches_fp64_within_the_sums_order(m, k, r, n, scale):
    """fp32: nothing rounded between the products, so only the order of the sums: 2^-20 of the absolute terms,
    and within twice the two fp32 matmuls' own error plus two roundings of the largest output."""
    x, down, up, out = inputs(m, k, r, n, dtype=torch.float32)
    ref, h = reference(x, down, up, out, scale)
    got = cpu_lora_term_(out.clone(), x, *lora_kernel_weights(down, up, torch.float32), scale)
    err = (got.double() - ref).abs()
    floor = abs(scale) * (x.double().abs() @ down.double().abs().t()) @ up.double().abs().t()
    assert (err <= (ref.abs() + out.double().abs() + floor) * 2.0 ** -20).all()
    two = out.clone().addmm_(x @ down.t(), up.t(), alpha=scale)
    assert err.max() <= 2 * (two.double() - ref).abs().max() + ref.abs().max() * 2.0 ** -22


@needs_kernel
def test_strided_rows_and_a_column_slice_of_the_output():
    """x and out as column slices of wider tensors (a fused q/k/v output's part): only those columns change."""
    x_wide, down, up, out_wide = inputs(3 * 50, 3 * 64, 8, 3 * 96)
    x = x_wide.view(3, 50, 192)[..., 64:128]
    wide = out_wide.view(3, 50, 288)
    out = wide[..., 96:192]
    assert row_stride(x) == 192 and row_stride(out) == 288
    before = wide.clone()
    ref, _ = reference(x.reshape(-1, 64), down[:, :64].contiguous(), up[:96], out.reshape(-1, 96), 0.5)
    cpu_lora_term_(out, x, *lora_kernel_weights(down[:, :64], up[:96]), 0.5)
    assert torch.equal(wide[..., :96], before[..., :96]) and torch.equal(wide[..., 192:], before[..., 192:])
    contiguous = before[..., 96:192].contiguous()
    cpu_lora_term_(contiguous, x.contiguous(), *lora_kernel_weights(down[:, :64], up[:96]), 0.5)
    assert torch.equal(out, contiguous)  # the strides change where it reads, not what it computes
    assert ((out.reshape(-1, 96).double() - ref).abs().max() < 0.1)


@needs_kernel
@pytest.mark.parametrize("r", [8, 24])
def test_same_bits_whatever_the_thread_count(r):
    x, down, up, out = inputs(333, 128, r, 144, seed=3)
    weights = lora_kernel_weights(down, up)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(cpu_lora_term_(out.clone(), x, *weights, 0.8))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_kernel
def test_padded_rank_adds_exact_zeros():
    """A rank-5 adapter padded to 8 gives what the same adapter with its three extra rows and columns zero
    gives, bit for bit, and a zero up leaves out as it was."""
    x, down, up, out = inputs(40, 64, 5, 32, seed=1)
    a = cpu_lora_term_(out.clone(), x, *lora_kernel_weights(down, up), 1.0)
    down8 = torch.cat([down, torch.zeros(3, 64, dtype=torch.bfloat16)])
    up8 = torch.cat([up, torch.zeros(32, 3, dtype=torch.bfloat16)], dim=1)
    assert torch.equal(a, cpu_lora_term_(out.clone(), x, *lora_kernel_weights(down8, up8), 1.0))
    assert torch.equal(out, cpu_lora_term_(out.clone(), x, *lora_kernel_weights(down, torch.zeros_like(up)), 1.0))


def test_weights_layout_and_bad_input():
    down = torch.arange(2 * 6, dtype=torch.float32).view(2, 6)
    up = torch.arange(3 * 2, dtype=torch.float32).view(3, 2) + 100
    d, u = lora_kernel_weights(down, up)
    assert d.shape == (8, 6) and torch.equal(d[:2].float(), down) and not d[2:].any()
    assert u.shape == (4, 3, 2) and torch.equal(u[0].float(), up) and not u[1:].any()
    with pytest.raises(ValueError, match=r"want down \(r, k\) and up \(n, r\)"):
        lora_kernel_weights(down, up.t())
    with pytest.raises(ValueError, match=f"rank {MAX_RANK + 1} is over"):
        lora_kernel_weights(torch.zeros(MAX_RANK + 1, 4), torch.zeros(4, MAX_RANK + 1))
    x, out = torch.zeros(4, 6, dtype=torch.bfloat16), torch.zeros(4, 3, dtype=torch.bfloat16)
    assert "want bf16 or fp32 CPU tensors of one dtype" in cpu_lora_term_supports(out.float(), x, d, u)
    assert "shapes do not agree" in cpu_lora_term_supports(out[:, :2], x, d, u)
    assert "evenly spaced rows" in cpu_lora_term_supports(out, torch.zeros(6, 4, dtype=torch.bfloat16).t(), d, u)
    assert "contiguous torch.bfloat16 kernel weights" in cpu_lora_term_supports(out, x, d.float(), u)
    d32, u32 = lora_kernel_weights(down, up, torch.float32)
    assert d32.shape == (8, 6) and u32.shape == (8, 3) and torch.equal(u32[:2], up.t()) and not u32[2:].any()
    with pytest.raises(ValueError, match="dtype must be bf16 or fp32"):
        lora_kernel_weights(down, up, torch.float16)
    with pytest.raises(ValueError, match="cpu_lora_term_: shapes do not agree"):
        cpu_lora_term_(out[:, :2], x, d, u)
    assert row_stride(torch.zeros(5, 7)[:, ::2]) is None and row_stride(torch.zeros(2, 3, 4)) == 4
    assert row_stride(torch.zeros(2, 3, 8)[:, :, :4]) == 8 and row_stride(torch.zeros(2, 4, 8).transpose(0, 1)) is None
