"""The upsample pass: nearest doubling folded into the following 3x3 conv, against the eager
upsample-then-conv (fp32 reference for bf16), following weight changes, and its fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.resnet import Upsample2D
from runtime.optim.upsample import FoldedUpsampleConv, fold_weight


def eager(module: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    return module.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def sampler(channels=8, out_channels=12, bias=True, seed=0) -> Upsample2D:
    torch.manual_seed(seed)
    m = Upsample2D(channels, out_channels=out_channels).requires_grad_(False)
    if not bias:
        m.conv.bias = None
    return m


@pytest.mark.parametrize("shape", [(2, 8, 6, 6), (1, 8, 7, 9), (1, 8, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_upsample_then_conv(shape, channels_last, bias):
    m = sampler(bias=bias)
    x = torch.randn(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = eager(m, x)
    m.conv_2x = FoldedUpsampleConv(m)
    out = m(x)
    assert out.shape == ref.shape == (shape[0], 12, 2 * shape[2], 2 * shape[3])
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    if m.conv_2x.onednn:  # fp32 runs the folded weights packed for oneDNN too (unpacked, they were reordered per call)
        assert tuple(x.shape) in m.conv_2x.packed.packed_cache


def test_bf16_error_is_that_of_a_bf16_conv():
    m = sampler(channels=32, out_channels=32).to(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    truth = eager(m.float(), x.float())
    m = m.to(torch.bfloat16)
    plain = eager(m, x).float()
    m.conv_2x = FoldedUpsampleConv(m)
    out = m(x)
    assert out.dtype == torch.bfloat16
    ours, theirs = (out.float() - truth).abs(), (plain - truth).abs()
    assert ours.max() <= 2 * theirs.max() and ours.mean() <= 2 * theirs.mean()


def test_follows_weight_changes_and_dtype():
    m = sampler()
    m.conv_2x = FoldedUpsampleConv(m)
    x = torch.randn(1, 8, 5, 5)
    m(x)
    with torch.no_grad():
        m.conv.weight.mul_(-3)  # in place (what load_state_dict does)
    assert (m(x) - eager(m, x)).abs().max() <= 1e-5 * eager(m, x).abs().max()
    m.conv.weight = nn.Parameter(torch.randn_like(m.conv.weight), requires_grad=False)  # new storage
    assert (m(x) - eager(m, x)).abs().max() <= 1e-5 * eager(m, x).abs().max()
    m.to(torch.bfloat16)
    assert m(x.bfloat16()).dtype == torch.bfloat16


def test_folded_kernel_phases():
    """Phase (0, 0) reads rows/columns (i-1, i): taps [w0, w1 + w2] in each direction; phase (1, 1)
    reads (i, i+1): [w0 + w1, w2]."""
    w = torch.arange(9.0).view(1, 1, 3, 3)
    folded = fold_weight(w)
    assert folded.shape == (4, 1, 2, 2)
    assert folded[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert folded[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]


def test_explicit_output_size_and_training_take_the_eager_path():
    m = sampler()
    m.conv_2x = lambda module, x: pytest.fail("the slot must not run with an explicit output size")
    x = torch.randn(1, 8, 5, 5)
    assert m(x, output_size=(11, 9)).shape == (1, 12, 11, 9)
    m = sampler().requires_grad_(True)
    m.conv_2x = FoldedUpsampleConv(m)
    m(torch.randn(1, 8, 4, 4)).sum().backward()
    assert m.conv.weight.grad is not None
