"""The kernels' error budget, shared by the kernel tests."""
from __future__ import annotations

import torch

# Error budgets, stated once: max|kernel - ref_fp32| <= 2 * max|torch_same_dtype - ref_fp32| + ATOL.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def assert_within_budget(out: torch.Tensor, torch_out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """The flash-attention error budget: the kernel may be at most twice as far from the fp32
    reference as PyTorch in the same dtype is, plus a small absolute floor for the dtype."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype} != {torch_out.dtype}"
    err = (out.float() - ref.float()).abs().max().item()
    torch_err = (torch_out.float() - ref.float()).abs().max().item()
    budget = 2 * torch_err + ATOL[out.dtype]
    assert err <= budget, f"{what}: max|kernel - ref| = {err:.3g} > 2 * {torch_err:.3g} + {ATOL[out.dtype]:g}"
