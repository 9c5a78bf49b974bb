"""runtime.kernels.group_norm (+ SiLU) against the fp32 reference (and F.group_norm in the same dtype)
under the interpreter: NCHW and channels_last, odd spatial sizes, SD's channel counts."""
from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from runtime import kernels  # noqa: E402
from kernel_budget import assert_within_budget  # noqa: E402

group_norm_module = importlib.import_module("runtime.kernels.group_norm")

# (shape, groups, channels_last, dtype). The interpreter runs programs one by one, so shapes are
# small; 32 groups over SD's channel counts appear once each in fp32 and bf16.
CASES = [
    ((1, 320, 3, 5), 32, True, torch.float32),  # SD UNet: 320 channels, 32 groups, odd spatial
    ((1, 128, 7, 5), 32, False, torch.bfloat16),  # SD VAE: 128 channels (4 per group)
    ((2, 64, 9, 7), 4, False, torch.float32),
    ((1, 64, 33, 17), 8, True, torch.bfloat16),  # several statistics slices per group: merged partials
    ((1, 40, 300), 8, False, torch.float32),  # (N, C, L)
    ((1, 16, 5, 3), 4, True, torch.float16),
]


def make_inputs(shape, channels_last, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(device=device, dtype=dtype)  # a mean far from 0
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    bias = torch.randn(shape[1], generator=g).to(device=device, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape, groups, channels_last, dtype", CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-g{c[1]}-{'cl' if c[2] else 'nchw'}-{str(c[3])[6:]}"
                              for c in CASES])
def test_matches_reference_within_budget(device, shape, groups, channels_last, dtype, silu):
    x, weight, bias = make_inputs(shape, channels_last, dtype, device)
    out = kernels.group_norm(x, groups, weight, bias, 1e-5, silu=silu)
    expected = F.group_norm(x, groups, weight, bias, 1e-5)
    expected = F.silu(expected) if silu else expected
    assert_within_budget(out, expected, kernels.group_norm_ref(x, groups, weight, bias, 1e-5, silu), "group_norm")
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


def test_without_affine_and_strided_input(device):
    """weight/bias None; a channel slice of a wider tensor (not dense) is read in place."""
    wide, _, _ = make_inputs((1, 48, 5, 7), False, torch.float32, device)
    x = wide[:, 8:40]
    out = kernels.group_norm(x, 8, None, None, eps=1e-6)
    torch.testing.assert_close(out, F.group_norm(x, 8, eps=1e-6), rtol=1e-5, atol=1e-5)
    permuted = wide.permute(0, 1, 3, 2)  # spatial dims not one run: copied, still right
    torch.testing.assert_close(kernels.group_norm(permuted, 8), F.group_norm(permuted, 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (dict(x=torch.zeros(4)), "x has shape (4,); expected (N, C, *spatial)"),
    (dict(num_groups=5), "num_groups=5 does not divide the 16 channels"),
    (dict(weight=torch.ones(8)), "weight has shape (8,); expected (16,)"),
    (dict(bias=torch.ones(16, 1)), "bias has shape (16, 1); expected (16,)"),
    (dict(x=torch.zeros(1, 16, 3, 3, dtype=torch.float64)), "dtype torch.float64; supported"),
    (dict(x=torch.zeros(1, 2048, 1, 1), num_groups=1), "2048 channels per group > 1024"),
])
def test_bad_inputs_raise_clear_errors(device, args, message):
    call = dict(x=torch.zeros(1, 16, 3, 3), num_groups=4, weight=None, bias=None) | args
    assert message in (kernels.group_norm_supports(**call) or "")
    with pytest.raises(ValueError, match=r"^runtime\.kernels\.group_norm: .*" + re.escape(message)):
        kernels.group_norm(**call)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.import_module("runtime.kernels.availability"), "INTERPRET", False)
    with pytest.raises(ValueError, match="device cpu is not supported"):
        kernels.group_norm(torch.zeros(1, 16, 3, 3), 4)


@pytest.mark.parametrize("hw, cpg", [(4096, 10), (64, 40), (262144, 4), (9, 1024)])
def test_prune_rule_keeps_tiles_fitting_the_group(hw, cpg):
    block_c = 1 << (cpg - 1).bit_length()
    kept = group_norm_module._prune_configs(group_norm_module.CUDA_CONFIGS, {"HW": hw}, BLOCK_C=block_c)
    assert kept
    for config in kept:
        assert config.kwargs["BLOCK_S"] <= max(16, 1 << (hw - 1).bit_length())
        assert config.kwargs["BLOCK_S"] * block_c <= 8192 or len(kept) == 1


def test_interpreter_bf16_rounding_matches_the_gpu(device):
    """Under the interpreter, bf16 outputs round to nearest even (torch's and the GPU's rounding),
    not by the interpreter's truncation: an affine-free GroupNorm of values that need rounding."""
    x = torch.randn(1, 8, 31, 29, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=torch.bfloat16)
    out = kernels.group_norm(x, 2, None, None, eps=1e-5)
    expected = kernels.group_norm_ref(x, 2, None, None, eps=1e-5).to(torch.bfloat16)  # fp32 result rounded by torch
    mismatched = (out != expected).float().mean().item()
    assert mismatched < 0.01, f"{mismatched:.1%} of elements round differently from torch"
