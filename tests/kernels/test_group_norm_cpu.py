"""Our bf16 CPU GroupNorm+SiLU kernel (runtime/kernels/group_norm_cpu.c) against the same formula in fp32.

Budget: never worse than eager bf16 (which rounds after the norm and again after the SiLU) on the
same inputs, and within two bf16 ulps of the output scale everywhere.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.group_norm_cpu import cpu_group_norm_ready, cpu_group_norm_silu, cpu_group_norm_supports

needs_kernel = pytest.mark.skipif(cpu_group_norm_ready() is not None, reason=f"CPU kernel: {cpu_group_norm_ready()}")


def inputs(shape, groups=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + 0.5).to(torch.bfloat16)
    w = (torch.randn(shape[1], generator=g) * 0.5 + 1).to(torch.bfloat16)
    b = torch.randn(shape[1], generator=g).to(torch.bfloat16)
    return x, groups, w, b


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 128, 32, 32), (2, 512, 8, 8), (1, 64, 5, 7), (3, 32, 17), (2, 256, 16, 16),
                                   (1, 64, 17, 19)])  # the last: 323 pixels, two uneven chunks
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_fp32_and_is_never_worse_than_eager(shape, layout):
    x, groups, w, b = inputs(shape)
    if layout == "channels_last":
        if x.ndim != 4:
            pytest.skip("channels-last is 4-D")
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.silu(F.group_norm(x.float(), groups, w.float(), b.float(), 1e-5))
    out = cpu_group_norm_silu(x, groups, w, b, 1e-5)
    eager = F.silu(F.group_norm(x, groups, w, b, 1e-5)).float()
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.stride() == x.stride()
    err = (out.float() - ref).abs().max()
    assert err <= (eager - ref).abs().max()
    assert err <= ref.abs().max() * 2.0 ** -7


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_constant_groups_and_thread_count(channels_last):
    x, groups, w, b = inputs((2, 64, 9, 9))
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


@pytest.mark.parametrize("case, match", [("fp32", "bfloat16"), ("groups", "divisible"), ("params", "affine"),
                                         ("layout", "contiguous or channels-last")])
def test_unsupported_calls_say_why(case, match):
    x, groups, w, b = inputs((2, 64, 4, 4))
    if case == "fp32":
        x = x.float()
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
