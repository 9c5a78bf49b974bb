"""Our CPU attention kernels against SDPA on the same inputs: bf16 (runtime/kernels/attention_cpu.c) against fp32
SDPA, fp32 (attention_f32_cpu.c) against fp64 SDPA.

Error budget in bf16: bf16 SDPA's own error on the same call (the kernel rounds where SDPA's flash kernel
does: scores and softmax in fp32, probabilities and output in bf16), with a floor of one bf16 ulp
of the largest |v| for calls where SDPA happens to round luckily. In fp32: twice fp32 SDPA's error, with
a floor of a few fp32 ulps of the largest |v|.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import attention_cpu, cpu_build
from runtime.kernels.attention_cpu import cpu_attention, cpu_attention_ready, cpu_attention_supports

needs_kernel = pytest.mark.skipif(cpu_attention_ready() is not None, reason=f"CPU kernel: {cpu_attention_ready()}")
needs_f32_kernel = pytest.mark.skipif(cpu_attention_ready(torch.float32) is not None,
                                      reason=f"CPU kernel: {cpu_attention_ready(torch.float32)}")

# (batch, heads, query tokens, key tokens, head_dim): the small UNet's self/cross attention at
# 256x256, SD 1.5's head dim, odd sizes that exercise every tail (tokens not a multiple of 8 or 16,
# odd key count, odd head dim, head dims across the 16-lane chunks).
SHAPES = [
    (2, 8, 1024, 1024, 16),
    (2, 8, 256, 77, 16),
    (2, 8, 64, 64, 40),
    (1, 5, 33, 19, 7),
    (1, 2, 100, 300, 64),
    (2, 3, 9, 1, 128),
    (1, 1, 17, 33, 1),
    (1, 4, 40, 50, 24),
]


def qkv(b, h, tq, tk, d, seed=0):
    """q, k, v as the model makes them: head-split views of projections (strided, not copied)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, tq, h * d, generator=g).to(torch.bfloat16)
    kv = (torch.randn(b, tk, 2 * h * d, generator=g) * 1.5).to(torch.bfloat16)
    q = x.view(b, tq, h, d).transpose(1, 2)
    k, v = (t.view(b, tk, h, d).transpose(1, 2) for t in kv.chunk(2, dim=-1))
    return q, k, v


def errors(out, q, k, v):
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sdpa = F.scaled_dot_product_attention(q, k, v).float()
    return (out.float() - ref).abs(), (sdpa - ref).abs(), v.float().abs().max().item()


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp32_reference_within_bf16_sdpa_error(shape):
    q, k, v = qkv(*shape)
    assert cpu_attention_supports(q, k, v) is None
    out = cpu_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    ours, sdpa, vmax = errors(out, q, k, v)
    ulp = vmax * 2.0 ** -8
    assert ours.max().item() <= max(2 * sdpa.max().item(), ulp), (ours.max().item(), sdpa.max().item())
    assert ours.mean().item() <= 2 * sdpa.mean().item() + ulp / 64


@needs_kernel
@pytest.mark.parametrize("tk", [19, 64])
def test_all_scores_far_below_zero(tk):
    """Every score below -250 (a row maximum far below the zero-padded keys' scores, which must stay
    out of the maximum): the softmax still normalizes to the reference."""
    q, k, v = qkv(1, 2, 21, tk, 16, seed=5)
    q, k = q.abs() * 20, -k.abs() * 20  # every row maximum below -250
    out = cpu_attention(q, k, v)
    ours, sdpa, vmax = errors(out, q, k, v)
    assert torch.isfinite(out).all()
    assert ours.max().item() <= max(2 * sdpa.max().item(), vmax * 2.0 ** -8)


@needs_kernel
def test_output_is_heads_last_memory_so_merging_heads_is_free():
    q, k, v = qkv(2, 8, 40, 77, 16)
    out = cpu_attention(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    assert merged.reshape(2, 40, 128).data_ptr() == out.data_ptr()


@needs_kernel
def test_contiguous_and_strided_inputs_agree_and_thread_count_does_not_change_bits():
    q, k, v = qkv(2, 4, 70, 45, 16, seed=3)
    out = cpu_attention(q, k, v)
    assert torch.equal(cpu_attention(q.contiguous(), k.contiguous(), v.contiguous()), out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_attention(q, k, v), out)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_softmax_is_stable_for_large_scores():
    q, k, v = qkv(1, 2, 16, 16, 32, seed=1)
    q, k = q * 40, k * 40  # scores of thousands: exp must not overflow
    out = cpu_attention(q, k, v)
    assert torch.isfinite(out.float()).all()
    ours, sdpa, vmax = errors(out, q, k, v)
    assert ours.max().item() <= max(2 * sdpa.max().item(), vmax * 2.0 ** -8)


@pytest.mark.parametrize("case, match", [
    ("mask", "masks are not supported"),
    ("fp16", "the CPU kernels are for bfloat16 or float32"),
    ("mixed", "all three alike"),
    ("head_dim", "head_dim 129"),
    ("shapes", "shapes do not match"),
    ("stride", "head dim must be contiguous"),
])
def test_unsupported_calls_say_why_and_the_kernel_refuses_them(case, match):
    q, k, v = qkv(1, 2, 8, 8, 16)
    mask = None
    if case == "mask":
        mask = torch.zeros(8, 8, dtype=torch.bfloat16)
    elif case == "fp16":
        q, k, v = q.half(), k.half(), v.half()
    elif case == "mixed":
        q = q.float()
    elif case == "head_dim":
        q, k, v = (torch.zeros(1, 1, 4, 129, dtype=torch.bfloat16) for _ in range(3))
    elif case == "shapes":
        k = k[:, :1]
    elif case == "stride":
        q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, head dim strided
    why = cpu_attention_supports(q, k, v, mask)
    assert why is not None and match in why
    if mask is None:
        with pytest.raises(ValueError, match=match):
            cpu_attention(q, k, v)


@needs_kernel
def test_compiles_as_one_custom_op_without_graph_breaks():
    q, k, v = qkv(2, 4, 32, 77, 16)

    def f(q, k, v):
        return cpu_attention(q, k, v).transpose(1, 2).reshape(2, 32, 64) * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(q, k, v), f(q, k, v))
    # the backends' path: one support check, then the op (traced) or the kernel (eager); None when unsupported
    tried = torch.compile(lambda q, k, v: attention_cpu.try_cpu_attention(q, k, v) * 2, fullgraph=True)
    assert torch.equal(tried(q, k, v), cpu_attention(q, k, v) * 2)
    assert attention_cpu.try_cpu_attention(q.half(), k.half(), v.half()) is None


@needs_f32_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_within_twice_fp32_sdpa_error(shape):
    if shape[-1] > attention_cpu.MAX_HEAD_DIM_F32:
        shape = (*shape[:-1], attention_cpu.MAX_HEAD_DIM_F32)
    q, k, v = (t.float() for t in qkv(*shape))
    out = cpu_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == q.shape
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    sdpa = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()
    floor = 4 * 2.0 ** -23 * v.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= max(2 * sdpa, floor)


def test_fp32_takes_head_dims_up_to_80():
    q = torch.zeros(1, 1, 4, 96)
    assert "head_dim 96 (1..80 in fp32)" in cpu_attention_supports(q, q, q)
    assert attention_cpu.try_cpu_attention(q, q, q) is None


@needs_f32_kernel
def test_fp32_large_scores_and_thread_counts():
    q, k, v = (t.float() for t in qkv(2, 3, 37, 29, 24, seed=3))
    q, k = q * 40, k * 40
    out = cpu_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all() and (out.double() - ref).abs().max().item() <= 1e-4 * v.abs().max().item()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_attention(q, k, v), out)
    finally:
        torch.set_num_threads(threads)


def test_build_failure_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setitem(attention_cpu._states, torch.bfloat16, {})
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpu_build, "kernel_cache_dir", lambda: tmp_path)
    monkeypatch.delenv("DIFFUSION_RUNTIME_CPU_FLAGS", raising=False)  # the faked probe is the host now
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    why = cpu_attention_ready()
    assert why is not None and "attention_cpu.c" in why and "no-such-compiler" in why
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    q, k, v = qkv(1, 1, 4, 4, 16)
    assert cpu_attention_supports(q, k, v) == why


def test_other_cpus_are_told_why(monkeypatch):
    monkeypatch.setitem(attention_cpu._states, torch.bfloat16, {})
    monkeypatch.setitem(attention_cpu._states, torch.float32, {})
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False, raising=False)
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    assert cpu_attention_ready() == "this CPU has no AVX512-BF16"
    assert cpu_attention_ready(torch.float32) == "this CPU has no AVX-512"
    monkeypatch.setitem(attention_cpu._states, torch.bfloat16, {})
    cpu_build.forget()
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "aarch64")
    assert "x86-64" in cpu_attention_ready()


@needs_kernel
def test_attention_module_with_the_cpu_backend_matches_sdpa_in_bf16():
    from runtime.models.attention import Attention, sdpa_backend
    from runtime.optim.attention import cpu_backend

    torch.manual_seed(0)
    attn = Attention(128, cross_attention_dim=64, heads=8, dim_head=16).to(torch.bfloat16)
    x = torch.randn(2, 100, 128, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 64, dtype=torch.bfloat16)
    ref = attn.float()(x.float(), ctx.float())
    attn.to(torch.bfloat16)
    outs = {}
    for name, backend in (("sdpa", sdpa_backend), ("cpu", cpu_backend)):
        attn.backend = backend
        outs[name] = attn(x, ctx).float()
    assert (outs["cpu"] - ref).abs().max() <= 2 * (outs["sdpa"] - ref).abs().max()
    # fp32 calls go to the fp32 kernel where it runs (SDPA otherwise): within twice SDPA's error against fp64
    attn.float()
    ref64 = attn.double()(x.double(), ctx.double())
    attn.float()
    for name, backend in (("sdpa", sdpa_backend), ("cpu", cpu_backend)):
        attn.backend = backend
        outs[name] = attn(x.float(), ctx.float()).double()
    assert (outs["cpu"] - ref64).abs().max() <= 2 * (outs["sdpa"] - ref64).abs().max()
