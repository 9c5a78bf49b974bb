"""Attention backend pass: the fastest backend this device runs, set on every Attention slot.

Choice (docs/ARCHITECTURE.md §4, level 1): on CUDA our fused Triton kernel where it supports the call's
shapes (SDPA otherwise, decided per call), else xformers if installed, else PyTorch SDPA. On a
machine without CUDA the Triton kernel is never selected for real work. On CPU our C kernels
(runtime/kernels/attention_cpu.py) take the calls they support: bf16 with AVX512-BF16, fp32 with AVX-512 (an
fp32 pipeline's error stays SDPA's: exact class), SDPA the rest. On a CPU with AMX tiles "auto" keeps
SDPA for bf16, whose bf16 matmuls use the tiles (runtime/optim/hardware.py: AMX_REASON).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from runtime.models.attention import sdpa_backend
from runtime.models.errors import OptimizationError

from .base import Pass
from .components import pipeline_device, pipeline_models
from .hardware import AMX_REASON, cpu_has_amx

BACKENDS = ("auto", "sdpa", "triton", "xformers", "cpu")


def triton_backend(q, k, v, mask=None):
    """Our fused kernel where it supports the inputs, SDPA where it does not."""
    from runtime import kernels

    if kernels.attention_supports(q, k, v, mask) is None:
        return kernels.attention(q, k, v, attn_mask=mask)
    return sdpa_backend(q, k, v, mask)


def cpu_backend(q, k, v, mask=None):
    """Our CPU kernels where they support the call (bf16 or fp32, no mask), SDPA where they do not."""
    from runtime.kernels.attention_cpu import try_cpu_attention

    out = try_cpu_attention(q, k, v, mask)
    return out if out is not None else sdpa_backend(q, k, v, mask)


def cpu_fp32_backend(q, k, v, mask=None):
    """Our fp32 CPU kernel for fp32 calls, SDPA for the rest (bf16 on AMX: its matmuls use the tiles)."""
    if q.dtype == torch.float32:
        return cpu_backend(q, k, v, mask)
    return sdpa_backend(q, k, v, mask)


def _cpu_kernel_ready(dtype: torch.dtype = torch.bfloat16) -> str | None:
    from runtime.kernels.attention_cpu import cpu_attention_ready

    return cpu_attention_ready(dtype)


def _choose_cpu() -> tuple[object, str]:
    """The "auto" choice on CPU: our kernels for the dtypes they run fast here, SDPA for the rest."""
    bf16_why, fp32_why = _cpu_kernel_ready(torch.bfloat16), _cpu_kernel_ready(torch.float32)
    if bf16_why is None and cpu_has_amx():
        bf16_why = f"{AMX_REASON}; backend='cpu' uses ours"
    if bf16_why is None and fp32_why is None:
        return cpu_backend, "our CPU kernels for bf16 (AVX512-BF16) and fp32 (AVX-512) calls, PyTorch SDPA for the rest"
    if bf16_why is None:
        return cpu_backend, f"our bf16 CPU kernel (AVX512-BF16) for bf16 calls, PyTorch SDPA for the rest (fp32: {fp32_why})"
    if fp32_why is None:
        return cpu_fp32_backend, f"our fp32 CPU kernel (AVX-512) for fp32 calls, PyTorch SDPA for the rest (bf16: {bf16_why})"
    return sdpa_backend, f"PyTorch SDPA (our CPU kernels unavailable: {bf16_why})"


def xformers_backend(q, k, v, mask=None):
    """xformers' memory-efficient attention; it wants (B, T, H, D)."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=mask)
    return out.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)


def _triton_ready() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from runtime import kernels

    if hasattr(kernels, "triton_available") and not kernels.triton_available():
        return "triton cannot run here"
    return None


def choose_backend(requested: str, device) -> tuple[object, str]:
    """The backend callable for ``requested`` on ``device``, and why it was chosen."""
    cuda = device.type == "cuda"
    if requested == "sdpa":
        return sdpa_backend, "PyTorch SDPA (requested)"
    if requested == "triton":
        if not cuda:
            raise OptimizationError("attention backend 'triton' needs a CUDA device; this pipeline is on " + str(device))
        why = _triton_ready()
        if why:
            raise OptimizationError(f"attention backend 'triton' unavailable: {why}")
        return triton_backend, "Triton fused attention (requested), SDPA for unsupported shapes"
    if requested == "cpu":
        why = "this pipeline is on " + str(device) if device.type != "cpu" else _cpu_kernel_ready()
        if why and device.type == "cpu" and _cpu_kernel_ready(torch.float32) is None:
            why = None
        if why:
            raise OptimizationError(f"attention backend 'cpu' unavailable: {why}")
        return cpu_backend, "our CPU kernels (requested), SDPA for other dtypes, masks and dtypes the CPU lacks"
    if requested == "xformers":
        if not cuda or importlib.util.find_spec("xformers") is None:
            raise OptimizationError("attention backend 'xformers' needs xformers installed and a CUDA device")
        return xformers_backend, "xformers (requested)"
    if cuda:
        why = _triton_ready()
        if why is None:
            return triton_backend, "Triton fused attention on CUDA, SDPA for unsupported shapes"
        if importlib.util.find_spec("xformers") is not None:
            return xformers_backend, f"xformers on CUDA ({why})"
        return sdpa_backend, f"PyTorch SDPA ({why}; xformers not installed)"
    if device.type == "cpu":
        return _choose_cpu()
    return sdpa_backend, f"PyTorch SDPA (no CUDA device: Triton and xformers need one; device is {device})"


@dataclass(frozen=True)
class AttentionPass(Pass):
    name = "attention"
    exact = True
    backend: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise OptimizationError(f"attention: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def supports(self, pipe) -> str | None:
        if not any(m.attention_modules() for m in pipeline_models(pipe).values()):
            return "no attention modules in this pipeline"
        return None

    def apply(self, pipe) -> None:
        backend, why = choose_backend(self.backend, pipeline_device(pipe))
        for m in pipeline_models(pipe).values():
            for module in m.attention_modules():
                self.log().set(module, "backend", backend)
        self._state()["why"] = why

    def describe(self) -> str:
        return self._state().get("why", "")
