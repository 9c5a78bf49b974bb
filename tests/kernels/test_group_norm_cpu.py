"""Our CPU GroupNorm+SiLU kernels (runtime/kernels/group_norm_drive.h: bf16 in group_norm_cpu.c, fp32 in
group_norm_f32_cpu.c) against the same formula in fp64.

Budgets: bf16, never worse than eager bf16 (which rounds after the norm and again after the SiLU) on the
same inputs, and within two bf16 ulps of the output scale everywhere; fp32, at most twice eager fp32's
error on the same inputs (the exact class of level 1: rounding only).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.group_norm_cpu import cpu_group_norm_ready, cpu_group_norm_silu, cpu_group_norm_supports

needs_kernel = pytest.mark.skipif(cpu_group_norm_ready() is not None, reason=f"CPU kernel: {cpu_group_norm_ready()}")
needs_f32 = pytest.mark.skipif(cpu_group_norm_ready(torch.float32) is not None,
                               reason=f"CPU kernel: {cpu_group_norm_ready(torch.float32)}")
SHAPES = [(2, 128, 32, 32), (2, 512, 8, 8), (1, 64, 5, 7), (3, 32, 17), (2, 256, 16, 16),
          (1, 64, 17, 19)]  # the last: 323 pixels, two uneven chunks


def inputs(shape, groups=32, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.randn(shape[1], generator=g) * 0.5 + 1).to(dtype)
    b = torch.randn(shape[1], generator=g).to(dtype)
    return x, groups, w, b


def _layout(x, layout):
    if layout == "channels_last":
        if x.ndim != 4:
            pytest.skip("channels-last is 4-D")
        return x.contiguous(memory_format=torch.channels_last)
    return x


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_fp32_and_is_never_worse_than_eager(shape, layout):
    x, groups, w, b = inputs(shape)
    x = _layout(x, layout)
    ref = F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5))
    out = cpu_group_norm_silu(x, groups, w, b, 1e-5)
    eager = F.silu(F.group_norm(x, groups, w, b, 1e-5)).float()
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.stride() == x.stride()
    err = (out.float() - ref).abs().max()
    assert err <= (eager - ref).abs().max()
    assert err <= ref.abs().max() * 2.0 ** -7


@needs_f32
@pytest.mark.parametrize("shape", SHAPES + [(1, 128, 96, 96)])  # the last: 36864 elements a group, many blocks
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fp32_errs_at_most_twice_eager_fp32_against_fp64(shape, layout):
    x, groups, w, b = inputs(shape, dtype=torch.float32)
    x = _layout(x, layout)
    ref = F.silu(F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5))
    out = cpu_group_norm_silu(x, groups, w, b, 1e-5)
    eager = F.silu(F.group_norm(x, groups, w, b, 1e-5))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.stride() == x.stride()
    err, eager_err = (out.double() - ref).abs().max(), (eager.double() - ref).abs().max()
    assert err <= 2 * eager_err, (float(err), float(eager_err))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_constant_groups_and_thread_count(channels_last, dtype):
    if cpu_group_norm_ready(dtype) is not None:
        pytest.skip(f"CPU kernel: {cpu_group_norm_ready(dtype)}")
    x, groups, w, b = inputs((2, 64, 9, 9), dtype=dtype)
    x[:, :2] = 3.0  # a constant group: variance 0, eps keeps it finite
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = cpu_group_norm_silu(x, groups, w, b, 1e-5)
    assert torch.isfinite(out.float()).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_group_norm_silu(x, groups, w, b, 1e-5), out)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_compiles_as_one_custom_op_without_graph_breaks():
    x, groups, w, b = inputs((1, 64, 4, 4))
    compiled = torch.compile(lambda x: cpu_group_norm_silu(x, groups, w, b, 1e-5) * 2, fullgraph=True)
    assert torch.equal(compiled(x), cpu_group_norm_silu(x, groups, w, b, 1e-5) * 2)


@pytest.mark.parametrize("case, match", [("fp64", "bfloat16 or float32"), ("groups", "divisible"), ("params", "affine"),
                                         ("layout", "contiguous or channels-last")])
def test_unsupported_calls_say_why(case, match):
    x, groups, w, b = inputs((2, 64, 4, 4))
    if case == "fp64":
        x = x.double()
    elif case == "groups":
        groups = 5
    elif case == "params":
        w = w.float()
    else:
        x = x.transpose(2, 3)  # neither contiguous nor channels-last
    why = cpu_group_norm_supports(x, groups, w, b)
    assert why is not None and match in why
    with pytest.raises(ValueError, match=match):
        cpu_group_norm_silu(x, groups, w, b)
