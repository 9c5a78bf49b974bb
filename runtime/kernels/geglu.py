"""GEGLU in Triton: the feed-forward's projection split into value and gate, ``value * gelu(gate)``.

GEGLU (Shazeer, 2020, "GLU Variants Improve Transformer"), as SD's transformer blocks use it:
``proj = x @ W^T + b`` of width 2D, ``value, gate = proj.split(D, dim=-1)``,
``out = value * gelu(gate)`` with the exact (erf) GELU. The matmul stays with PyTorch (cuBLAS,
or whatever inductor picks); the kernel fuses the split, the GELU and the product, so the
(…, 2D) projection is read once and only the (…, D) result is written, instead of PyTorch's
separate gelu and mul launches with their (…, D) temporaries.

Supported
- ``geglu(x, weight, bias)``: x (…, K), weight (2D, K), bias (2D,) or None, as
  ``nn.Linear(K, 2D)`` stores them. ``geglu_activation(proj)`` is the fused part alone, for a
  model that computes the projection itself.
- proj of any shape (…, 2D) whose last dim has stride 1 and whose leading dims flatten to one
  strided dim (contiguous, or a row slice); others are copied to contiguous first.
- fp16, bf16, fp32, with the GELU computed in fp32.
- GPUs: NVIDIA with Triton; CPU only under ``TRITON_INTERPRET=1`` (tests).

Caveats
- Forward only (no autograd). The tanh approximation of GELU is not offered (SD uses erf).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .availability import (KERNEL_DTYPES, INTERPRET, device_reason, launcher, next_power_of_2,
                           register_op, require_triton, round_bf16_rtne, tl, triton)


def geglu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """value * gelu(gate) of the projection, computed and returned in fp32."""
    proj = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    value, gate = proj.chunk(2, dim=-1)
    return value * (0.5 * gate * (1.0 + torch.erf(gate * 0.7071067811865476)))


def geglu_activation_supports(proj: torch.Tensor) -> str | None:
    """None when ``geglu_activation`` runs on ``proj``, else the reason it does not."""
    if triton is None:
        return "Triton is not installed"
    if not isinstance(proj, torch.Tensor):
        return f"proj is a {type(proj).__name__}, not a tensor"
    if proj.dim() < 1 or proj.shape[-1] % 2:
        return f"proj has shape {tuple(proj.shape)}; the last dim must be even (value and gate halves)"
    if proj.dtype not in KERNEL_DTYPES:
        return f"proj has dtype {proj.dtype}; supported: fp16, bf16, fp32"
    if proj.numel() == 0:
        return f"empty input of shape {tuple(proj.shape)}"
    if torch.is_grad_enabled() and proj.requires_grad:
        return "forward only: proj requires grad (run under torch.no_grad / inference_mode)"
    return device_reason(proj)


if triton is not None:

    def _prune_configs(configs, named_args, **kwargs):
        """Drop column blocks wider than the half width and row blocks taller than the row count."""
        max_d = max(16, next_power_of_2(named_args["half"]))
        max_m = max(1, next_power_of_2(named_args["rows"]))
        kept = [c for c in configs if c.kwargs["BLOCK_D"] <= max_d and c.kwargs["BLOCK_M"] <= max_m]

        def padded(c):  # elements a block covers, padding included, for this problem
            return max(c.kwargs["BLOCK_M"], max_m) * max(c.kwargs["BLOCK_D"], max_d)

        return kept or [min(configs, key=padded)]

    CUDA_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_D": d}, num_warps=w)
                    for m, d, w in [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (8, 256, 4), (8, 512, 8),
                                    (16, 256, 8), (16, 128, 4), (32, 128, 8), (64, 64, 8), (16, 64, 4),
                                    (4, 64, 2), (1, 128, 2)]]
    INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_D": 64})]
    _CONFIGS = INTERPRETER_CONFIGS if INTERPRET else CUDA_CONFIGS

    @triton.autotune(configs=_CONFIGS, key=["rows", "half"],
                     prune_configs_by={"early_config_prune": _prune_configs})
    @triton.jit
    def _geglu_kernel(Proj, Out, stride_pm, stride_om, rows, half,
                      EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = (offs_m < rows)[:, None] & (offs_d < half)[None, :]
        row = Proj + offs_m.to(tl.int64)[:, None] * stride_pm + offs_d[None, :]
        value = tl.load(row, mask=ok, other=0.0).to(tl.float32)
        gate = tl.load(row + half, mask=ok, other=0.0).to(tl.float32)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))  # exact GELU: x Phi(x)
        out = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
        y = value * gelu
        if EMULATE_BF16:  # interpreter only: round to nearest even as the GPU does (it truncates)
            y = round_bf16_rtne(y)
        tl.store(out, y.to(Out.dtype.element_ty), mask=ok)

    def _geglu_impl(proj: torch.Tensor) -> torch.Tensor:
        half = proj.shape[-1] // 2
        proj2 = proj.reshape(-1, proj.shape[-1])  # a view here: (rows, 2D)
        rows = proj2.shape[0]
        out = torch.empty(proj.shape[:-1] + (half,), dtype=proj.dtype, device=proj.device)
        out2 = out.view(rows, half)

        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(half, meta["BLOCK_D"]))

        launcher(_geglu_kernel)[grid](proj2, out2, proj2.stride(0), out2.stride(0), rows, half,
                                      EMULATE_BF16=INTERPRET and proj.dtype == torch.bfloat16)
        return out

    def _geglu_fake(proj):
        return torch.empty(proj.shape[:-1] + (proj.shape[-1] // 2,), dtype=proj.dtype, device=proj.device)

    _geglu_op = register_op("geglu_activation", _geglu_impl, _geglu_fake)


def _rows_are_flat(t: torch.Tensor) -> bool:
    """Last dim unit-stride and leading dims one strided run: then reshape(-1, last) is a view."""
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    for i in range(t.dim() - 2):
        if t.shape[i + 1] != 1 and t.shape[i] != 1 and t.stride(i) != t.stride(i + 1) * t.shape[i + 1]:
            return False
    return True


def geglu_activation(proj: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` of ``value, gate = proj.chunk(2, -1)``, by the Triton kernel."""
    require_triton("geglu")
    reason = geglu_activation_supports(proj)
    if reason is not None:
        raise ValueError(f"runtime.kernels.geglu: {reason}")
    if not _rows_are_flat(proj):
        proj = proj.contiguous()
    return _geglu_op(proj)


def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """GEGLU feed-forward input layer: ``F.linear(x, weight, bias)`` then the fused split * gelu.

    weight is (2D, K) as ``nn.Linear(K, 2D).weight``; returns (…, D). Raises
    ``TritonUnavailableError`` without Triton and ``ValueError`` on unsupported inputs.
    """
    require_triton("geglu")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] % 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"runtime.kernels.geglu: weight has shape {shape}; expected (2 * D, in_features)")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"runtime.kernels.geglu: x has shape {shape}; its last dim must be in_features = {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"runtime.kernels.geglu: bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")
    if x.dtype != weight.dtype:
        raise ValueError(f"runtime.kernels.geglu: x is {x.dtype} but weight is {weight.dtype}")
    return geglu_activation(F.linear(x, weight, bias))
