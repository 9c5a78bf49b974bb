"""Fused attention forward in Triton: flash-attention's online softmax, one pass over K/V.

Algorithm: FlashAttention (Dao et al., 2022), forward only, non-causal: each program holds a
block of queries and streams key/value blocks, keeping the running row max ``m``, the running
softmax denominator ``l`` and the fp32 output accumulator, so the (Tq, Tk) score matrix is never
written to memory.

Supported
- Layout (batch, heads, tokens, head_dim), SDPA's; q/k/v may be any strided view (e.g. the
  ``(B, T, H, D).transpose(1, 2)`` the UNet produces): strides are passed, nothing is copied.
- head_dim 1..256 (SD uses 40, 64, 80, 160): the kernel pads to ``BLOCK_D =
  max(16, next_power_of_2(head_dim))`` and masks the padding lanes.
- Any query length and any key length (cross-attention over 77 text tokens): partial blocks are
  masked. Any batch, any heads with batch * heads <= 65535 (the grid's second axis).
- fp16, bf16, fp32 inputs (q, k, v of one dtype); fp32 accumulation of scores, softmax and output.
- Optional additive float mask (or boolean mask, True = attend) broadcastable to (B, H, Tq, Tk):
  broadcast dimensions are read with stride 0, never materialised.
- GPUs: NVIDIA with Triton (sm_80+ is what the autotune configs are sized for; older GPUs run
  the smaller configs), AMD ROCm through Triton's HIP backend (untested). CPU only under
  ``TRITON_INTERPRET=1`` (tests; slow).

Caveats
- Forward only: no autograd. ``attention_supports`` reports inputs that require grad.
- No dropout, no causal mask, value head_dim must equal the query's, no GQA.
- fp16/bf16: the probabilities are rounded to the input dtype before the P @ V product (as in
  FlashAttention), so the error is of the order of one rounding of the output; the tests hold it
  to twice PyTorch's own error in that dtype. fp32 inputs use IEEE fp32 dots (not TF32).
- Rows whose mask is -inf (or False) everywhere give 0, as PyTorch's SDPA does.
"""
from __future__ import annotations

import functools
import math

import torch

from .availability import (KERNEL_DTYPES, INTERPRET, device_reason, launcher, next_power_of_2,
                           register_op, require_triton, round_bf16_rtne, tl, triton)

MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis, which indexes batch * heads
SMEM_BUDGET = 96 * 1024  # bytes, when the device does not say: fits every sm_80+ GPU (sm_86/89: 99 KB)
_LOG2E = 1.4426950408889634


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v computed and returned in fp32: the reference the kernel is held to."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows: 0, as SDPA gives
    return torch.matmul(probs, v.float())


def attention_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> str | None:
    """None when ``attention`` runs on these inputs, else the reason it does not (for dispatch)."""
    if triton is None:
        return "Triton is not installed"
    tensors = {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.dim() != 4:
            return f"{name} has shape {tuple(t.shape)}; expected 4 dims (batch, heads, tokens, head_dim)"
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {t.dtype}; supported: fp16, bf16, fp32"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    (b, h, tq, d), (bk, hk, tk, dk), (bv, hv, tv, dv) = q.shape, k.shape, v.shape
    if (b, h) != (bk, hk) or (b, h) != (bv, hv):
        return (f"batch/heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                "(no broadcasting or GQA)")
    if tk != tv:
        return f"k has {tk} tokens but v has {tv}"
    if not d == dk == dv:
        return f"head_dim differs: q {d}, k {dk}, v {dv}"
    if d > MAX_HEAD_DIM:
        return f"head_dim {d} > {MAX_HEAD_DIM}"
    if q.numel() == 0 or k.numel() == 0:
        return f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}"
    if b * h > MAX_GRID_Y:
        return f"batch * heads = {b * h} > {MAX_GRID_Y}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        return "forward only: an input requires grad (run under torch.no_grad / inference_mode)"
    reason = device_reason(q, k, v)
    if reason is not None:
        return reason
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return f"attn_mask is a {type(attn_mask).__name__}, not a tensor"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return f"attn_mask has dtype {attn_mask.dtype}; expected bool or floating point"
        if attn_mask.device != q.device:
            return f"attn_mask is on {attn_mask.device}, q on {q.device}"
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, h, tq, tk))
        except RuntimeError:
            return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {(b, h, tq, tk)}"
        if attn_mask.dim() > 4:
            return f"attn_mask has {attn_mask.dim()} dims; at most 4"
    return None


@functools.lru_cache(maxsize=None)
def smem_budget(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (opt-in maximum), else SMEM_BUDGET."""
    if device.type != "cuda":
        return SMEM_BUDGET
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or SMEM_BUDGET)


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Tq, D) view of a (B, Tq, H, D) buffer: the caller's transpose(1, 2).reshape is then free."""
    b, h, tq, d = q.shape
    return torch.empty((b, tq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


if triton is not None:

    def _prune_configs(configs, named_args, **kwargs):
        """Drop blocks larger than the sequence they tile and configs whose tiles overflow shared memory."""
        seq_q, seq_k = named_args["seq_q"], named_args["seq_k"]
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        elem = named_args["Q"].element_size()
        budget = smem_budget(named_args["Q"].device)
        max_m, max_n = max(16, next_power_of_2(seq_q)), max(16, next_power_of_2(seq_k))

        def smem(c):
            # Q tile, plus K and V tiles for each prefetched stage: an upper estimate (Triton 3.9 on
            # sm_90 allocates less). A config that still does not fit is skipped by the autotuner
            # (it catches out-of-resource errors); pruning only saves its compile time.
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            return (bm * block_d + 2 * bn * block_d * max(c.num_stages - 1, 1)) * elem

        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n
                and smem(c) <= budget]
        return kept or [min(configs, key=smem)]

    CUDA_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
                                         (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (64, 128, 4, 2),
                                         (32, 32, 4, 2), (16, 32, 2, 1)]]
    # Interpreter: one small config (no benchmarking; the interpreter's cost grows with block count).
    INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32})]
    _CONFIGS = INTERPRETER_CONFIGS if INTERPRET else CUDA_CONFIGS

    @triton.autotune(configs=_CONFIGS, key=["seq_q", "seq_k", "head_dim", "HAS_MASK"],
                     prune_configs_by={"early_config_prune": _prune_configs})
    @triton.jit
    def _attention_fwd_kernel(
        Q, K, V, Mask, Out,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_ob, stride_oh, stride_om, stride_od,
        num_heads, seq_q, seq_k, head_dim, qk_scale,
        HAS_MASK: tl.constexpr, IEEE_DOT: tl.constexpr, EMULATE_BF16: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_heads).to(tl.int64)  # int64: offsets of large batches overflow int32
        h = (pid_bh % num_heads).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seq_q
        d_ok = offs_d < head_dim  # padding lanes of a non-power-of-two head_dim load as 0

        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if EMULATE_BF16:
            q = q.to(tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        mask_base = Mask + b * stride_mb + h * stride_mh

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, seq_k, BLOCK_N):
            cols = start_n + offs_n
            n_ok = cols < seq_k
            k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                          mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
            if EMULATE_BF16:
                k_t = k_t.to(tl.float32)
            if IEEE_DOT:
                s = tl.dot(q, k_t, input_precision="ieee")
            else:
                s = tl.dot(q, k_t)
            s = s * qk_scale  # scale * log2(e): softmax in base 2, exp2 is one instruction
            if HAS_MASK:
                bias = tl.load(mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn,
                               mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                s += bias.to(tl.float32) * 1.4426950408889634
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows with every key so far masked to -inf: subtract 0 so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_sub)
            p = tl.math.exp2(s - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            if EMULATE_BF16:
                p_in, v = round_bf16_rtne(p), v.to(tl.float32)
            else:
                p_in = p.to(V.dtype.element_ty)  # fp16/bf16: P rounded for the tensor cores, as in FlashAttention
            if IEEE_DOT:
                pv = tl.dot(p_in, v, input_precision="ieee")
            else:
                pv = tl.dot(p_in, v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        # Rows masked everywhere have l = 0 and acc = 0: output 0, as PyTorch's SDPA does.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        if EMULATE_BF16:
            out = round_bf16_rtne(out)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
        b, h, tq, d = q.shape
        tk = k.shape[2]
        out = _empty_output(q)
        # Triton's interpreter computes bf16 dots wrongly and truncates fp32 -> bf16 casts: under it,
        # bf16 operands go to the dots upcast to fp32 (exact) and casts round to nearest even
        # first, so the emulated kernel rounds exactly where and how the GPU kernel does.
        emulate_bf16 = INTERPRET and q.dtype == torch.bfloat16
        if mask is None:
            mask_arg, mask_strides = q, (0, 0, 0, 0)  # never read: HAS_MASK=False
        else:
            # Broadcast dims become stride 0 (no copy). (…) -> (B, H, Tq, Tk)
            mask_arg = mask.expand(b, h, tq, tk)
            mask_strides = mask_arg.stride()

        def grid(meta):
            return (triton.cdiv(tq, meta["BLOCK_M"]), b * h)

        launcher(_attention_fwd_kernel)[grid](
            q, k, v, mask_arg, out,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            h, tq, tk, d, scale * _LOG2E,
            HAS_MASK=mask is not None, IEEE_DOT=q.dtype == torch.float32 or emulate_bf16,
            EMULATE_BF16=emulate_bf16,
            BLOCK_D=max(16, next_power_of_2(d)),
        )
        return out

    def _attention_fake(q, k, v, mask, scale):
        return _empty_output(q)

    _attention_op = register_op("attention", _attention_impl, _attention_fake)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` on (B, H, T, D) inputs, by the Triton kernel.

    Raises ``TritonUnavailableError`` without Triton and ``ValueError`` (naming the problem) on
    inputs the kernel does not support; ``attention_supports`` tells in advance.
    """
    require_triton("attention")
    if dropout_p != 0.0:
        raise ValueError(f"runtime.kernels.attention: dropout_p={dropout_p} is not supported (inference kernel)")
    if is_causal:
        raise ValueError("runtime.kernels.attention: is_causal=True is not supported (non-causal kernel)")
    reason = attention_supports(q, k, v, attn_mask)
    if reason is not None:
        raise ValueError(f"runtime.kernels.attention: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # True = attend, as in SDPA
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~attn_mask, float("-inf"))
    return _attention_op(q, k, v, attn_mask, scale)
