"""runtime.kernels.geglu / geglu_activation against the fp32 reference (and PyTorch in the same dtype)
under the interpreter; odd widths, strided projections, bad inputs."""
from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from runtime import kernels  # noqa: E402
from kernel_budget import assert_within_budget  # noqa: E402

geglu_module = importlib.import_module("runtime.kernels.geglu")


def torch_geglu(x, weight, bias):
    """What diffusers' GEGLU computes, in the inputs' dtype: linear, chunk, value * gelu(gate)."""
    value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


# (leading shape, in_features, half width D, dtype)
CASES = [((2, 33), 40, 72, torch.float32), ((1, 77), 24, 80, torch.bfloat16), ((5,), 16, 33, torch.float16),
         ((1, 9), 32, 160, torch.float32)]


@pytest.mark.parametrize("lead, k, d, dtype", CASES, ids=[f"{c[0]}-k{c[1]}-d{c[2]}-{str(c[3])[6:]}" for c in CASES])
def test_matches_reference_within_budget(device, lead, k, d, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(2 * d, k, generator=g) * k ** -0.5).to(device=device, dtype=dtype)
    bias = torch.randn(2 * d, generator=g).to(device=device, dtype=dtype)
    out = kernels.geglu(x, weight, bias)
    assert out.shape == (*lead, d) and out.dtype == dtype
    assert_within_budget(out, torch_geglu(x, weight, bias), kernels.geglu_ref(x, weight, bias), "geglu")


def test_activation_on_strided_projection(device):
    """A row slice and a column-sliced projection (non-contiguous) give PyTorch's result."""
    proj = torch.randn(7, 3, 2 * 24 + 8, device=device)[:, :, :48]  # row stride 56, last-dim stride 1
    value, gate = proj.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu_activation(proj), value * F.gelu(gate), rtol=1e-5, atol=1e-6)
    proj_t = torch.randn(48, 5, device=device).t()  # last dim not unit-stride: copied first
    value, gate = proj_t.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.geglu_activation(proj_t), value * F.gelu(gate), rtol=1e-5, atol=1e-6)


def test_no_bias(device):
    x, weight = torch.randn(3, 8, device=device), torch.randn(32, 8, device=device)
    torch.testing.assert_close(kernels.geglu(x, weight, None), torch_geglu(x, weight, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (dict(weight=torch.zeros(15, 8)), "weight has shape (15, 8); expected (2 * D, in_features)"),
    (dict(x=torch.zeros(3, 7)), "x has shape (3, 7); its last dim must be in_features = 8"),
    (dict(bias=torch.zeros(8)), "bias has shape (8,); expected (16,)"),
    (dict(x=torch.zeros(3, 8, dtype=torch.float64), weight=torch.zeros(16, 8, dtype=torch.float64)),
     "dtype torch.float64; supported"),
    (dict(x=torch.zeros(3, 8, dtype=torch.float16)), "x is torch.float16 but weight is torch.float32"),
])
def test_bad_inputs_raise_clear_errors(device, args, message):
    call = dict(x=torch.zeros(3, 8), weight=torch.zeros(16, 8), bias=None) | args
    with pytest.raises(ValueError, match=r"^runtime\.kernels\.geglu: .*" + re.escape(message)):
        kernels.geglu(**call)


def test_odd_projection_width_is_refused(device):
    assert "last dim must be even" in kernels.geglu_activation_supports(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="last dim must be even"):
        kernels.geglu_activation(torch.zeros(2, 7))


def test_prune_rule_fits_blocks_to_the_problem():
    kept = geglu_module._prune_configs(geglu_module.CUDA_CONFIGS, {"rows": 3, "half": 40})
    assert kept and all(c.kwargs["BLOCK_M"] <= 4 and c.kwargs["BLOCK_D"] <= 64 for c in kept)
    kept = geglu_module._prune_configs(geglu_module.CUDA_CONFIGS, {"rows": 8192, "half": 5120})
    assert kept == geglu_module.CUDA_CONFIGS  # SD's 64x64 latents with D = 5120: every config is a candidate
