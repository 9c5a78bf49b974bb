"""runtime.kernels.attention against the fp32 reference (and PyTorch in the same dtype) under the
interpreter: odd lengths, 77-token keys, SD's head dims, strided inputs, masks; bad inputs."""
from __future__ import annotations

import importlib
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from runtime import kernels  # noqa: E402
from kernel_budget import assert_within_budget  # noqa: E402

attention_module = importlib.import_module("runtime.kernels.attention")


def torch_same_dtype(q, k, v, mask=None, scale=None):
    """PyTorch's attention math in the inputs' dtype (matmul, softmax, matmul): the comparator
    flash-attention's own tests use. Its softmax probabilities are rounded to the dtype, as ours are."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1) @ v


def make_qkv(b, h, tq, tk, d, dtype, device, strided=True, seed=0):
    """q, k, v as a fused-projection UNet makes them (strided): a chunk of a (B, T, 2*H*D)
    projection, viewed (B, T, H, D) and seen as (B, H, T, D); else contiguous (B, H, T, D)."""
    g = torch.Generator().manual_seed(seed)

    def one(t):
        proj = torch.randn(b, t, 2 * h * d, generator=g).to(device=device, dtype=dtype)
        x = proj[..., : h * d].view(b, t, h, d).transpose(1, 2)  # (B, H, T, D), token stride 2*H*D
        return x if strided else x.contiguous()

    return one(tq), one(tk), one(tk)


# (batch, heads, q tokens, k tokens, head_dim, dtype, strided, mask kind)
CASES = [
    (1, 1, 33, 77, 40, torch.float32, True, None),  # batch*heads = 1, cross-attention to 77 tokens
    (1, 1, 33, 77, 40, torch.bfloat16, True, None),
    (1, 2, 78, 78, 160, torch.float32, True, None),  # head_dim 160 pads to 256; 77+1 self-attention
    (1, 2, 78, 77, 160, torch.bfloat16, False, None),
    (2, 1, 20, 77, 80, torch.bfloat16, True, "full"),  # additive mask of full shape
    (1, 2, 17, 20, 64, torch.float32, True, "keys"),  # (B, 1, 1, Tk) padding mask: broadcast strides
    (1, 3, 40, 33, 128, torch.float32, False, None),
    (1, 1, 17, 33, 64, torch.float16, True, "bool"),  # fp16 (slow on CPU numpy: kept tiny)
]


def make_mask(kind, b, h, tq, tk, dtype, device):
    g = torch.Generator().manual_seed(1)
    if kind is None:
        return None
    if kind == "full":
        return torch.randn(b, h, tq, tk, generator=g).to(device=device, dtype=dtype)
    if kind == "keys":  # mask out the last 5 keys of every query, as a padding mask does
        mask = torch.zeros(b, 1, 1, tk)
        mask[..., -5:] = float("-inf")
        return mask.to(device=device, dtype=dtype)
    return (torch.rand(b, 1, tq, tk, generator=g) > 0.3).to(device)  # bool: True = attend


@pytest.mark.parametrize("b, h, tq, tk, d, dtype, strided, mask_kind", CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-{str(c[5])[6:]}-{'strided' if c[6] else 'contig'}"
                              f"-{c[7]}" for c in CASES])
def test_matches_reference_within_budget(device, b, h, tq, tk, d, dtype, strided, mask_kind):
    q, k, v = make_qkv(b, h, tq, tk, d, dtype, device, strided)
    assert q.is_contiguous() is not strided
    mask = make_mask(mask_kind, b, h, tq, tk, dtype, device)
    out = kernels.attention(q, k, v, attn_mask=mask)
    assert out.shape == (b, h, tq, d) and out.dtype == dtype
    ref = kernels.attention_ref(q, k, v, attn_mask=mask)
    assert ref.dtype == torch.float32
    assert_within_budget(out, torch_same_dtype(q, k, v, mask), ref, "attention")


def test_matches_sdpa_in_fp32_with_scale(device):
    q, k, v = make_qkv(2, 2, 9, 12, 40, torch.float32, device)
    out = kernels.attention(q, k, v, scale=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_output_layout_makes_the_head_merge_free(device):
    """The output is a (B, H, T, D) view of a (B, T, H, D) buffer, as the model consumes it."""
    q, k, v = make_qkv(1, 2, 5, 7, 16, torch.float32, device)
    out = kernels.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()


def test_fully_masked_row_gives_zero_like_sdpa(device):
    q, k, v = make_qkv(1, 1, 4, 6, 16, torch.float32, device)
    mask = torch.zeros(1, 1, 4, 6, device=device)
    mask[..., 1, :] = float("-inf")
    out = kernels.attention(q, k, v, attn_mask=mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[..., 1, :], torch.zeros_like(out[..., 1, :]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---- bad inputs -------------------------------------------------------------------------------
def _qkv(device, dtype=torch.float32):
    return make_qkv(1, 2, 5, 7, 16, dtype, device)


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v: (q[0], k, v), "q has shape (2, 5, 16); expected 4 dims"),
    (lambda q, k, v: (q, k[..., :8], v), "head_dim differs: q 16, k 8, v 16"),
    (lambda q, k, v: (q, k, v[:, :, :6]), "k has 7 tokens but v has 6"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "batch/heads differ"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype torch.float64; supported: fp16, bf16, fp32"),
    (lambda q, k, v: (q, k.half(), v), "dtypes differ"),
    (lambda q, k, v: (torch.zeros(1, 2, 5, 300), torch.zeros(1, 2, 7, 300), torch.zeros(1, 2, 7, 300)),
     "head_dim 300 > 256"),
    (lambda q, k, v: (q[:, :, :0], k, v), "empty input"),
])
def test_bad_inputs_raise_clear_errors(device, mutate, message):
    q, k, v = mutate(*_qkv(device))
    assert message in (kernels.attention_supports(q, k, v) or "")
    with pytest.raises(ValueError, match=rf"^runtime\.kernels\.attention: .*{re.escape(message)}"):
        kernels.attention(q, k, v)


def test_bad_mask_and_sdpa_only_features(device):
    q, k, v = _qkv(device)
    with pytest.raises(ValueError, match=r"attn_mask shape \(3, 7\) does not broadcast to \(1, 2, 5, 7\)"):
        kernels.attention(q, k, v, attn_mask=torch.zeros(3, 7, device=device))
    with pytest.raises(ValueError, match="attn_mask has dtype torch.int64"):
        kernels.attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="dropout_p=0.1 is not supported"):
        kernels.attention(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="is_causal=True is not supported"):
        kernels.attention(q, k, v, is_causal=True)


def test_requires_grad_is_refused(device):
    q, k, v = _qkv(device)
    with torch.enable_grad():
        q.requires_grad_(True)
        assert "forward only" in kernels.attention_supports(q, k, v)
        with pytest.raises(ValueError, match="forward only"):
            kernels.attention(q, k, v)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.import_module("runtime.kernels.availability"), "INTERPRET", False)
    q, k, v = _qkv("cpu")
    assert "device cpu is not supported" in kernels.attention_supports(q, k, v)
    with pytest.raises(ValueError, match="device cpu is not supported: the Triton kernels run on CUDA"):
        kernels.attention(q, k, v)


# ---- autotune pruning -------------------------------------------------------------------------
def prune(seq_q, seq_k, head_dim, dtype):
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    named_args = {"seq_q": seq_q, "seq_k": seq_k, "Q": torch.empty(0, dtype=dtype)}
    return attention_module._prune_configs(attention_module.CUDA_CONFIGS, named_args, BLOCK_D=block_d)


def test_prune_rule_fits_blocks_to_the_problem():
    # 77 text tokens: key blocks up to next_pow2(77) = 128, none larger; any query block.
    kept = prune(4096, 77, 40, torch.float16)
    assert {c.kwargs["BLOCK_N"] for c in kept} == {32, 64, 128}
    assert {c.kwargs["BLOCK_M"] for c in kept} == {16, 32, 64, 128}
    # 20 tokens each way: blocks of at most 32.
    kept = prune(20, 20, 64, torch.bfloat16)
    assert kept and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 32 for c in kept)
    # head_dim 160 in fp32 (BLOCK_D 256, 4-byte elements): only tiles within the shared-memory budget.
    kept = prune(1024, 1024, 160, torch.float32)
    assert 0 < len(kept) < len(attention_module.CUDA_CONFIGS)
    assert all((c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"] * max(c.num_stages - 1, 1)) * 256 * 4
               <= attention_module.SMEM_BUDGET for c in kept)  # a CPU tensor: the default budget
    # Nothing fits a 1-token problem: the rule still leaves the smallest config.
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in prune(1, 1, 8, torch.float16)] == [(16, 32)]
