"""Our fp32 Winograd F(2x2, 3x3) CPU convolution (runtime/kernels/winograd_f32_cpu.c) against the fp64 convolution.

Budget: nothing is rounded to a narrower type, so the error is the direct fp32 convolution's order:
rms and max-abs within 3x the direct fp32 convolution's on the same inputs (measured 0.4-1.6x), or
within four fp32 ulps of the output's scale where the direct one is exact to an ulp (a 1x1 map).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.winograd_f32_cpu import cpu_winograd_conv3x3_f32, cpu_winograd_f32_ready, winograd_weight_f32

needs_kernel = pytest.mark.skipif(cpu_winograd_f32_ready() is not None, reason=f"CPU kernel: {cpu_winograd_f32_ready()}")
G = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1.0]], dtype=torch.float64)


def inputs(n, c, h, w, co, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5
    b = torch.randn(co, generator=g) * 0.1 if bias else None
    return x, wt, b


def rms(a: torch.Tensor) -> float:
    return a.double().pow(2).mean().sqrt().item()


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 128, 32, 32, 128), (1, 64, 7, 9, 32), (3, 3, 5, 3, 64), (1, 40, 1, 1, 32),
                                   (2, 256, 8, 8, 96), (1, 33, 20, 22, 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64_within_the_budget(shape, layout, bias):
    n, c, h, w, co = shape
    x, wt, b = inputs(n, c, h, w, co, bias=bias)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), padding=1)
    direct = F.conv2d(x, wt, b, padding=1)
    out = cpu_winograd_conv3x3_f32(x, winograd_weight_f32(wt), b)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    ulps = 4 * 2.0 ** -23 * ref.abs().max().item()
    assert rms(out - ref) <= max(3 * rms(direct - ref), ulps)
    assert (out - ref).abs().max() <= max(3 * (direct - ref).abs().max().item(), ulps)


@needs_kernel
def test_thread_counts_agree():
    x, wt, b = inputs(2, 64, 12, 10, 64)
    u = winograd_weight_f32(wt)
    out = cpu_winograd_conv3x3_f32(x, u, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_winograd_conv3x3_f32(x, u, b), out)  # each tile's sums do not depend on the split
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_winograd_weight_f32_is_g_w_gt_packed():
    g = torch.Generator().manual_seed(1)
    wt = torch.randn(64, 5, 3, 3, generator=g)
    u = winograd_weight_f32(wt)
    assert u.shape == (2, 16, 5, 32) and u.dtype == torch.float32
    want = (G @ wt.double() @ G.T).reshape(2, 32, 5, 16).permute(0, 3, 2, 1)  # (C_out / 32, position, C_in, 32)
    torch.testing.assert_close(u.double(), want, rtol=2.0 ** -22, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\).*got \(64, 4, 5, 5\)"):
        winograd_weight_f32(torch.zeros(64, 4, 5, 5))
    with pytest.raises(ValueError, match="multiple of 32"):
        winograd_weight_f32(torch.zeros(48, 4, 3, 3))


@needs_kernel
def test_bad_calls_name_what_is_wrong():
    x, wt, b = inputs(1, 32, 4, 4, 32)
    u = winograd_weight_f32(wt)
    with pytest.raises(ValueError, match="fp32 CPU input, got 4-D torch.bfloat16"):
        cpu_winograd_conv3x3_f32(x.bfloat16(), u, b)
    with pytest.raises(ValueError, match=r"\(C_out / 32, 16, 16, 32\) transformed weight, got \(1, 16, 32, 32\)"):
        cpu_winograd_conv3x3_f32(x[:, :16], u, b)
    with pytest.raises(ValueError, match=r"bias of 32 values, got \(16,\)"):
        cpu_winograd_conv3x3_f32(x, u, b[:16])
    with pytest.raises(ValueError, match="empty input"):
        cpu_winograd_conv3x3_f32(x[:0], u, b)


def test_runs_on_cpus_with_avx512_but_no_bf16_and_on_avx2_ones(monkeypatch, tmp_path):
    """Built without the bf16 extension (cpu_build.FP32_FLAGS), it needs AVX-512 only; without AVX-512 its AVX2
    sibling runs; without either, it says why. The kernels run only where the real host has what they need
    (a kernel run under faked flags dies of an illegal instruction)."""
    from runtime.kernels import cpu_build, cpu_features, winograd_cpu, winograd_f32_cpu

    real = cpu_features.host()
    compiler = cpu_build._compiler() is not None

    def fake(avx512: bool, avx2: bool = True):
        for module in (winograd_f32_cpu, winograd_cpu):
            monkeypatch.setattr(module, "_state", {})
        monkeypatch.setattr(cpu_build, "_loaded", {})
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: avx2, raising=False)

    def runs_here():
        x, w, b = torch.randn(1, 32, 6, 6), torch.randn(32, 32, 3, 3) / 17, torch.randn(32)
        out = winograd_f32_cpu.cpu_winograd_conv3x3_f32(x, winograd_f32_cpu.winograd_weight_f32(w), b)
        assert (out - F.conv2d(x, w, b, padding=1)).abs().max() <= 1e-4

    monkeypatch.setattr(cpu_build, "kernel_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    fake(avx512=True)
    assert winograd_cpu.cpu_winograd_ready() == "this CPU has no AVX512-BF16"
    if compiler:
        assert winograd_f32_cpu.cpu_winograd_f32_ready() is None
        assert winograd_f32_cpu.bound_source() == winograd_f32_cpu.SOURCE
        if real.avx512:
            runs_here()
    fake(avx512=False)
    if compiler:
        assert winograd_f32_cpu.cpu_winograd_f32_ready() is None
        assert winograd_f32_cpu.bound_source() == winograd_f32_cpu.AVX2_SOURCE
        if real.avx2:
            runs_here()
    fake(avx512=False, avx2=False)
    assert winograd_f32_cpu.cpu_winograd_f32_ready() == "this CPU has no AVX2"
    assert winograd_f32_cpu.bound_source() is None


def test_the_avx2_sibling_gives_the_avx512_kernels_numbers_bit_for_bit():
    """Same packed kernel, same transforms, the same chain of FMAs per output: the two libraries agree exactly
    (run where the host has both; on an AVX2-only host the fp64 budget tests above cover the sibling)."""
    from runtime.kernels import winograd_f32_cpu

    results = []
    for source in winograd_f32_cpu.SOURCES:
        with winograd_f32_cpu.variant(source) as why:
            if why is not None:
                pytest.skip(f"{source.name}: {why}")
            x, wt, b = inputs(2, 37, 9, 14, 64, seed=3)
            res = torch.randn(2, 64, 9, 14, generator=torch.Generator().manual_seed(4))
            res = res.contiguous(memory_format=torch.channels_last)
            u = winograd_weight_f32(wt)
            results.append((u, winograd_f32_cpu.winograd_launch_f32(x, u, b, residual=res)))
    (u_a, y_a), (u_b, y_b) = results
    assert torch.equal(u_a, u_b) and torch.equal(y_a, y_b)


@needs_kernel
def test_a_residual_gives_the_sum_bit_for_bit():
    from runtime.kernels.winograd_f32_cpu import winograd_launch_f32

    x, wt, b = inputs(2, 48, 6, 11, 64)
    res = torch.randn(2, 64, 6, 11).contiguous(memory_format=torch.channels_last)
    u = winograd_weight_f32(wt)
    assert torch.equal(winograd_launch_f32(x, u, b, residual=res), res + cpu_winograd_conv3x3_f32(x, u, b))
