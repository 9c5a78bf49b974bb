"""Attention backend pass: the fastest backend this device runs, set on every Attention slot.

Choice (DESIGN.md §4, level 1): on CUDA our fused Triton kernel where it supports the call's
shapes (SDPA otherwise, decided per call), else xformers if installed, else PyTorch SDPA. On a
machine without CUDA the Triton kernel is never selected for real work. On a CPU with AVX512-BF16
our C kernel (kernels/attention_cpu.c) takes the bf16 calls it supports and SDPA the rest, so an
fp32 pipeline computes exactly what it did; it pays once precision (level 2) runs bf16. On a CPU
with AMX tiles "auto" keeps SDPA, whose bf16 matmuls use the tiles (optim/hardware.py: AMX_REASON).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from models.attention import sdpa_backend
from models.errors import OptimizationError

from .base import Pass
from .components import pipeline_device, pipeline_models
from .hardware import AMX_REASON, cpu_has_amx

BACKENDS = ("auto", "sdpa", "triton", "xformers", "cpu")


def triton_backend(q, k, v, mask=None):
    """Our fused kernel where it supports the inputs, SDPA where it does not."""
    import kernels

    if kernels.attention_supports(q, k, v, mask) is None:
        return kernels.attention(q, k, v, attn_mask=mask)
    return sdpa_backend(q, k, v, mask)


def cpu_backend(q, k, v, mask=None):
    """Our bf16 CPU kernel where it supports the call (bf16, no mask), SDPA where it does not."""
    from kernels.attention_cpu import try_cpu_attention

    out = try_cpu_attention(q, k, v, mask)
    return out if out is not None else sdpa_backend(q, k, v, mask)


def _cpu_kernel_ready() -> str | None:
    from kernels.attention_cpu import cpu_attention_ready

    return cpu_attention_ready()


def xformers_backend(q, k, v, mask=None):
    """xformers' memory-efficient attention; it wants (B, T, H, D)."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=mask)
    return out.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)


def _triton_ready() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import kernels

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
        if why:
            raise OptimizationError(f"attention backend 'cpu' unavailable: {why}")
        return cpu_backend, "our bf16 CPU kernel (requested), SDPA for other dtypes and masks"
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
        why = _cpu_kernel_ready()
        if why is None and cpu_has_amx():
            return sdpa_backend, f"PyTorch SDPA ({AMX_REASON}; backend='cpu' uses ours)"
        if why is None:
            return cpu_backend, "our bf16 CPU kernel (AVX512-BF16) for bf16 calls, PyTorch SDPA for the rest"
        return sdpa_backend, f"PyTorch SDPA (our CPU kernel unavailable: {why})"
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
        saved = self._state().setdefault("previous", [])
        for m in pipeline_models(pipe).values():
            for module in m.attention_modules():
                saved.append((module, module.backend))
                module.backend = backend
        self._state()["why"] = why

    def describe(self) -> str:
        return self._state().get("why", "")

    def revert(self, pipe) -> None:
        for module, backend in reversed(self._state().pop("previous", [])):
            module.backend = backend
