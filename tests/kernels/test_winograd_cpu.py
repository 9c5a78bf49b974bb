"""Our bf16 Winograd F(2x2, 3x3) CPU convolution (runtime/kernels/winograd_cpu.c) against the fp64 convolution.

Budget: the transformed input and kernel are rounded to bf16 (the direct bf16 convolution rounds only
its output), so the error is a few times the direct one's: rms within 3.5x the direct bf16
convolution's on the same inputs (measured 2.5x) and max-abs within 2^-6 of the output's scale.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.winograd_cpu import (cpu_winograd_conv3x3, cpu_winograd_ready, cpu_winograd_up2_conv3x3, winograd_weight,
                                  work_split)

needs_kernel = pytest.mark.skipif(cpu_winograd_ready() is not None, reason=f"CPU kernel: {cpu_winograd_ready()}")


def inputs(n, c, h, w, co, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(torch.bfloat16)
    wt = (torch.randn(co, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(torch.bfloat16)
    b = (torch.randn(co, generator=g) * 0.1).to(torch.bfloat16) if bias else None
    return x, wt, b


def rms(a: torch.Tensor) -> float:
    return a.double().pow(2).mean().sqrt().item()


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 128, 32, 32, 128), (1, 64, 7, 9, 32), (3, 2, 5, 3, 64), (1, 256, 8, 8, 96),
                                   (1, 32, 20, 22, 32), (1, 40, 1, 1, 32), (2, 64, 2, 3, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_fp64_within_the_budget(shape, layout):
    n, c, h, w, co = shape
    x, wt, b = inputs(n, c, h, w, co)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), wt.double(), b.double(), padding=1)
    direct = F.conv2d(x, wt, b, padding=1)
    out = cpu_winograd_conv3x3(x, winograd_weight(wt), b)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = out.double() - ref
    assert rms(err) <= 3.5 * rms(direct.double() - ref)
    assert err.abs().max() <= ref.abs().max() * 2.0 ** -6


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 64, 8, 8, 64), (1, 32, 5, 7, 96), (1, 2, 1, 1, 32), (3, 40, 3, 2, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsampled_matches_fp64_within_the_budget(shape, bias):
    n, c, h, w, co = shape
    x, wt, b = inputs(n, c, h, w, co, bias=bias)
    doubled = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    ref = F.conv2d(doubled, wt.double(), None if b is None else b.double(), padding=1)
    direct = F.conv2d(doubled.to(torch.bfloat16), wt, b, padding=1)
    out = cpu_winograd_up2_conv3x3(x, winograd_weight(wt, up2=True), b)
    assert out.shape == (n, co, 2 * h, 2 * w) and out.is_contiguous(memory_format=torch.channels_last)
    err = out.double() - ref
    assert rms(err) <= 3.5 * rms(direct.double() - ref)
    assert err.abs().max() <= ref.abs().max() * 2.0 ** -6


@needs_kernel
def test_without_bias_and_every_thread_count_give_the_same_bits():
    x, wt, _ = inputs(2, 64, 13, 11, 64, bias=False)
    u = winograd_weight(wt)
    ref = F.conv2d(x.double(), wt.double(), padding=1)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpu_winograd_conv3x3(x, u, None))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert (outs[0].double() - ref).abs().max() <= ref.abs().max() * 2.0 ** -6


def test_work_split_uses_every_thread():
    assert work_split(512, 4, 2) == (64, 1)  # many tiles: whole groups, all channels per task
    assert work_split(100, 4, 2) == (56, 1)  # two groups, one per thread
    group, parts = work_split(8, 40, 2)  # one 4x4-pixel map: the channels are split instead
    assert group == 8 and parts == 2
    assert work_split(3, 1, 4) == (8, 1)  # nothing to split


@needs_kernel
def test_winograd_weight_is_g_w_gt_packed():
    g = torch.Generator().manual_seed(1)
    wt = torch.randn(64, 4, 3, 3, generator=g).to(torch.bfloat16)
    u = winograd_weight(wt)
    assert u.shape == (2, 16, 2, 32, 2) and u.dtype == torch.bfloat16
    assert torch.equal(winograd_weight(wt, up2=True), u[:, [0, 1, 3, 4, 5, 7, 12, 13, 15]])
    gm = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1.0]], dtype=torch.float64)
    full = (gm @ wt.double() @ gm.T).reshape(2, 32, 2, 2, 16)  # (C_out / 32, 32, C_in / 2, 2, position)
    want = full.permute(0, 4, 2, 1, 3)
    assert ((u.double() - want).abs() <= want.abs() * 2.0 ** -8).all()  # one bf16 rounding
    # output channel 33 = block 1, lane 1; input channel 3 = pair 1, slot 1; position (2, 1) = 9
    assert u[1, 9, 1, 1, 1].item() == pytest.approx((gm @ wt[33, 3].double() @ gm.T)[2, 1].item(), rel=2.0 ** -8)
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\).*got \(64, 4, 5, 5\)"):
        winograd_weight(torch.zeros(64, 4, 5, 5))
    with pytest.raises(ValueError, match="multiple of 32"):
        winograd_weight(torch.zeros(48, 4, 3, 3))


@needs_kernel
def test_bad_calls_name_what_is_wrong():
    x, wt, b = inputs(1, 32, 4, 4, 32)
    u = winograd_weight(wt)
    with pytest.raises(ValueError, match="bf16 CPU input, got 4-D torch.float32"):
        cpu_winograd_conv3x3(x.float(), u, b)
    with pytest.raises(ValueError, match=r"channel count \(16\)"):
        cpu_winograd_conv3x3(x[:, :16], u, b)
    with pytest.raises(ValueError, match="bias of 32 values, got \\(16,\\)"):
        cpu_winograd_conv3x3(x, u, b[:16])
    with pytest.raises(ValueError, match=r"cpu_winograd_up2_conv3x3: .*\(C_out / 32, 9, 16, 32, 2\)"):
        cpu_winograd_up2_conv3x3(x, u, b)  # the 16-position kernel


@needs_kernel
def test_a_residual_is_added_before_the_one_rounding():
    from runtime.kernels.winograd_cpu import winograd_launch

    x, wt, b = inputs(2, 64, 9, 7, 96)
    res = torch.randn(2, 96, 9, 7).to(torch.bfloat16)  # NCHW: taken to channels-last first
    u = winograd_weight(wt)
    fused = winograd_launch(x, u, b, up2=False, residual=res)
    conv = cpu_winograd_conv3x3(x, u, b)
    ref = F.conv2d(x.double(), wt.double(), b.double(), padding=1) + res.double()
    assert fused.is_contiguous(memory_format=torch.channels_last)
    assert (fused.double() - ref).abs().max() <= (conv + res).double().sub(ref).abs().max()
    assert (fused.double() - ref).abs().max() <= ref.abs().max() * 2.0 ** -6
    with pytest.raises(ValueError, match=r"residual: want a torch.bfloat16 CPU tensor of shape \(2, 96, 9, 7\)"):
        winograd_launch(x, u, b, up2=False, residual=res[:, :32])
