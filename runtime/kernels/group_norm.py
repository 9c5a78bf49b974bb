"""GroupNorm forward (+ optional fused SiLU) in Triton, for NCHW and channels_last activations.

Two launches: (1) statistics, where each program reduces one slice of one (sample, group) and
writes its (count, mean, M2) partial, so small batches still fill the GPU; (2) normalise, where
each program merges its group's partials (Chan et al.'s parallel variance) and writes one
(spatial block x group channels) tile as ``y = x * a + b`` with ``a = rstd * weight``,
``b = bias - mean * a``, then ``y * sigmoid(y)`` when ``silu``. Statistics are fp32 and
computed tile by tile as exact mean and centred M2, never as E[x^2] - E[x]^2.

Supported
- x of shape (N, C, *spatial) in fp16, bf16 or fp32 whose spatial dims flatten to one strided
  dim: contiguous NCHW, channels_last, (N, C, L). Other layouts are copied to contiguous first.
  The output has x's layout (a channels_last input gives a channels_last output).
- Any num_groups dividing C with at most 1024 channels per group: SD UNets/VAEs use 32 groups
  over 128..1280 channels. Any spatial size (odd sizes are masked).
- weight and bias of shape (C,), either may be None; any floating dtype (read as fp32).
- GPUs: NVIDIA with Triton; CPU only under ``TRITON_INTERPRET=1`` (tests).

Caveats
- Forward only (no autograd).
- The normalise launch re-reads x, so the op reads x twice and writes y once: it is bandwidth
  bound at about 3 tensor sizes of traffic, against PyTorch's 3 (GroupNorm) + 2 (separate SiLU).
"""
from __future__ import annotations

import torch

from .availability import (KERNEL_DTYPES, INTERPRET, device_reason, launcher, next_power_of_2,
                           register_op, require_triton, round_bf16_rtne, tl, triton)

MAX_CHANNELS_PER_GROUP = 1024
MAX_SPLIT = 64  # partials per group; the normalise kernel merges them in one vector
# Elements one statistics program reduces at least. Interpreter: small, so that the tests' small
# shapes exercise the merge of partials and no program loops long in Python.
SLICE_ELEMENTS = 512 if INTERPRET else 8192


def group_norm_ref(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """GroupNorm (+ SiLU) from its formula, computed and returned in fp32."""
    n, c = x.shape[:2]
    xg = x.float().reshape(n, num_groups, -1)  # (N, G, C/G * spatial)
    mean = xg.mean(dim=-1, keepdim=True)
    var = (xg - mean).pow(2).mean(dim=-1, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.float().reshape(shape)
    if bias is not None:
        y = y + bias.float().reshape(shape)
    return y * torch.sigmoid(y) if silu else y


def _spatial_is_flat(x: torch.Tensor) -> bool:
    """True when dims 2.. of x are one strided run (then flatten(2) is a view)."""
    for i in range(2, x.dim() - 1):
        if x.shape[i + 1] != 1 and x.shape[i] != 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return False
    return True


def group_norm_supports(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> str | None:
    """None when ``group_norm`` runs on these inputs, else the reason it does not."""
    if triton is None:
        return "Triton is not installed"
    if not isinstance(x, torch.Tensor):
        return f"x is a {type(x).__name__}, not a tensor"
    if x.dim() < 2:
        return f"x has shape {tuple(x.shape)}; expected (N, C, *spatial)"
    if x.dtype not in KERNEL_DTYPES:
        return f"x has dtype {x.dtype}; supported: fp16, bf16, fp32"
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        return f"num_groups={num_groups!r} does not divide the {c} channels"
    if c // num_groups > MAX_CHANNELS_PER_GROUP:
        return f"{c // num_groups} channels per group > {MAX_CHANNELS_PER_GROUP}"
    if x.numel() == 0:
        return f"empty input of shape {tuple(x.shape)}"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (c,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            return f"{name} has shape {shape}; expected ({c},)"
        if not p.is_floating_point():
            return f"{name} has dtype {p.dtype}; expected floating point"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return "forward only: an input requires grad (run under torch.no_grad / inference_mode)"
    return device_reason(*[t for t in (x, weight, bias) if t is not None])


if triton is not None:

    def _prune_configs(configs, named_args, **kwargs):
        """Keep tiles of 1K..8K elements no longer than the spatial run they cover."""
        block_c = kwargs.get("BLOCK_C", named_args.get("BLOCK_C"))
        run = named_args["chunk"] if "chunk" in named_args else named_args["HW"]
        max_s = max(16, next_power_of_2(run))
        kept = [c for c in configs
                if c.kwargs["BLOCK_S"] <= max_s and 1024 <= c.kwargs["BLOCK_S"] * block_c <= 8192]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_S"])]

    CUDA_CONFIGS = [triton.Config({"BLOCK_S": s}, num_warps=w)
                    for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) for w in (4, 8)]
    INTERPRETER_CONFIGS = [triton.Config({"BLOCK_S": 64})]
    _CONFIGS = INTERPRETER_CONFIGS if INTERPRET else CUDA_CONFIGS

    @triton.autotune(configs=_CONFIGS, key=["HW", "cpg", "chunk"],
                     prune_configs_by={"early_config_prune": _prune_configs})
    @triton.jit
    def _group_norm_stats_kernel(
        X, Partial, stride_xn, stride_xc, stride_xs,
        HW, cpg, num_groups, chunk, split,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = (pid_ng // num_groups).to(tl.int64)
        g = (pid_ng % num_groups).to(tl.int64)
        base = X + n * stride_xn + g * cpg * stride_xc
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < cpg
        s_begin = pid_s * chunk
        s_end = tl.minimum(s_begin + chunk, HW)
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for s0 in range(s_begin, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            ok = (offs_s < s_end)[:, None] & c_ok[None, :]
            x = tl.load(base + offs_s[:, None] * stride_xs + offs_c[None, :] * stride_xc,
                        mask=ok, other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_C)
            n_tile = (tl.minimum(s_end - s0, BLOCK_S) * cpg).to(tl.float32)  # valid elements
            mean_tile = tl.sum(x, axis=None) / n_tile
            d = tl.where(ok, x - mean_tile, 0.0)
            m2_tile = tl.sum(d * d, axis=None)
            # Chan et al.: merge (count, mean, m2) with the tile's; stable for large means.
            total = count + n_tile
            delta = mean_tile - mean
            mean = mean + delta * (n_tile / total)
            m2 = m2 + m2_tile + delta * delta * (count * n_tile / total)
            count = total
        out = Partial + (pid_ng * split + pid_s) * 3
        tl.store(out, count)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.autotune(configs=_CONFIGS, key=["HW", "cpg"],
                     prune_configs_by={"early_config_prune": _prune_configs})
    @triton.jit
    def _group_norm_apply_kernel(
        X, Y, W, B, Partial,
        stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
        HW, cpg, num_groups, split, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, EMULATE_BF16: tl.constexpr,
        SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_s = tl.program_id(1)
        n = (pid_ng // num_groups).to(tl.int64)
        g = (pid_ng % num_groups).to(tl.int64)
        # Merge the group's partials: total mean, then M2 = sum(m2_i + n_i (mean_i - mean)^2).
        offs_p = tl.arange(0, SPLIT_P2)
        p_ok = offs_p < split
        parts = Partial + (pid_ng * split + offs_p) * 3
        cnt = tl.load(parts, mask=p_ok, other=0.0)
        mu = tl.load(parts + 1, mask=p_ok, other=0.0)
        m2 = tl.load(parts + 2, mask=p_ok, other=0.0)
        total = tl.sum(cnt, axis=0)
        mean = tl.sum(cnt * mu, axis=0) / total
        var = tl.sum(m2 + cnt * (mu - mean) * (mu - mean), axis=0) / total
        rstd = 1.0 / tl.sqrt(var + eps)

        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < cpg
        channel = g * cpg + offs_c
        a = tl.zeros([BLOCK_C], dtype=tl.float32) + rstd
        if HAS_WEIGHT:
            a = a * tl.load(W + channel, mask=c_ok, other=0.0).to(tl.float32)
        shift = -mean * a
        if HAS_BIAS:
            shift += tl.load(B + channel, mask=c_ok, other=0.0).to(tl.float32)

        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = (offs_s < HW)[:, None] & c_ok[None, :]
        x = tl.load(X + n * stride_xn + offs_s[:, None] * stride_xs + channel[None, :] * stride_xc,
                    mask=ok, other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_C)
        y = x * a[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        if EMULATE_BF16:  # interpreter only: round to nearest even as the GPU does (it truncates)
            y = round_bf16_rtne(y)
        tl.store(Y + n * stride_yn + offs_s[:, None] * stride_ys + channel[None, :] * stride_yc,
                 y.to(Y.dtype.element_ty), mask=ok)

    def _group_norm_impl(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, eps: float, silu: bool) -> torch.Tensor:
        n, c = x.shape[:2]
        y = torch.empty_like(x)  # keeps a dense x's layout (channels_last stays channels_last)
        x3, y3 = x.reshape(n, c, -1), y.reshape(n, c, -1)  # views: (N, C, spatial)
        hw = x3.shape[2]
        cpg = c // num_groups
        # Split each group's reduction so the statistics launch has enough programs: slices of
        # at least SLICE_ELEMENTS, at most MAX_SPLIT of them (merged in one vector later).
        split = max(1, min(MAX_SPLIT, triton.cdiv(hw * cpg, SLICE_ELEMENTS)))
        chunk = triton.cdiv(hw, split)
        partial = torch.empty((n * num_groups, split, 3), dtype=torch.float32, device=x.device)
        block_c = next_power_of_2(cpg)
        launcher(_group_norm_stats_kernel)[(n * num_groups, split)](
            x3, partial, x3.stride(0), x3.stride(1), x3.stride(2),
            hw, cpg, num_groups, chunk, split, BLOCK_C=block_c,
        )

        def grid(meta):
            return (n * num_groups, triton.cdiv(hw, meta["BLOCK_S"]))

        launcher(_group_norm_apply_kernel)[grid](
            x3, y3, weight if weight is not None else x3, bias if bias is not None else x3, partial,
            x3.stride(0), x3.stride(1), x3.stride(2), y3.stride(0), y3.stride(1), y3.stride(2),
            hw, cpg, num_groups, split, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu,
            EMULATE_BF16=INTERPRET and x.dtype == torch.bfloat16,
            SPLIT_P2=max(2, next_power_of_2(split)), BLOCK_C=block_c,
        )
        return y

    def _group_norm_fake(x, num_groups, weight, bias, eps, silu):
        return torch.empty_like(x)

    _group_norm_op = register_op("group_norm", _group_norm_impl, _group_norm_fake)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``, followed by SiLU when ``silu``, in one kernel pair.

    Raises ``TritonUnavailableError`` without Triton and ``ValueError`` on unsupported inputs.
    """
    require_triton("group_norm")
    reason = group_norm_supports(x, num_groups, weight, bias)
    if reason is not None:
        raise ValueError(f"runtime.kernels.group_norm: {reason}")
    if not _spatial_is_flat(x):
        x = x.contiguous()  # rare layouts: one copy, then the strided kernel
    return _group_norm_op(x, num_groups, weight, bias, float(eps), bool(silu))

