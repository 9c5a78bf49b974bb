"""Our bf16 CPU GEGLU kernel (runtime/kernels/geglu_cpu.c) against the same formula in fp32.

Budget: one bf16 rounding of the exact result (2^-8 relative, round-to-nearest gives 2^-9), where
eager bf16 rounds twice (gelu, then the product); plus ABS_FLOOR where the reference itself is off:
fp32 ``0.5 x (1 + erf(x / sqrt 2))`` cancels to 0 below about x = -5.5, where the true gelu (which
our erfc form keeps) is still around -1e-7.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.geglu_cpu import cpu_geglu, cpu_geglu_ready, cpu_geglu_supports

needs_kernel = pytest.mark.skipif(cpu_geglu_ready() is not None, reason=f"CPU kernel: {cpu_geglu_ready()}")


ABS_FLOOR = 1e-6


def reference(proj: torch.Tensor) -> torch.Tensor:
    value, gate = proj.float().chunk(2, dim=-1)
    return value * F.gelu(gate)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 1024, 1024), (2, 77, 30), (5, 14), (3, 2, 34), (1, 2)])
def test_matches_fp32_within_one_bf16_rounding(shape):
    torch.manual_seed(0)
    proj = (torch.randn(*shape) * 3).to(torch.bfloat16)
    out, ref = cpu_geglu(proj), reference(proj)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() <= ref.abs() * 2.0 ** -8 + ABS_FLOOR).all()
    value, gate = proj.chunk(2, dim=-1)
    eager = (value * F.gelu(gate)).float()
    assert (out.float() - ref).abs().max() <= (eager - ref).abs().max()


@needs_kernel
def test_gelu_over_its_whole_range():
    gate = torch.linspace(-12, 12, 24001)
    proj = torch.cat([torch.ones_like(gate), gate]).view(1, -1).to(torch.bfloat16)
    out, ref = cpu_geglu(proj).float(), reference(proj)
    assert ((out - ref).abs() <= ref.abs() * 2.0 ** -8 + ABS_FLOOR).all()
    assert out[0, proj[0, 24001:].float() < -10].abs().max() < 1e-20  # the far tail underflows cleanly


@needs_kernel
def test_thread_count_does_not_change_bits():
    proj = torch.randn(4, 100, 64).to(torch.bfloat16)
    out = cpu_geglu(proj)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_geglu(proj), out)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_compiles_as_one_custom_op_without_graph_breaks():
    proj = torch.randn(2, 16, 40).to(torch.bfloat16)
    compiled = torch.compile(lambda p: cpu_geglu(p) + 1, fullgraph=True)
    assert torch.equal(compiled(proj), cpu_geglu(proj) + 1)


@pytest.mark.parametrize("proj, match", [
    (torch.randn(3, 8), "bfloat16"),
    (torch.randn(3, 7).to(torch.bfloat16), "must be even"),
    (torch.randn(8, 3).to(torch.bfloat16).t(), "contiguous"),
])
def test_unsupported_calls_say_why(proj, match):
    why = cpu_geglu_supports(proj)
    assert why is not None and match in why
    with pytest.raises(ValueError, match=match):
        cpu_geglu(proj)
