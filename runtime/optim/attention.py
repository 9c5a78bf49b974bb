"""Attention backend pass: the fastest backend this device runs, set on every Attention slot.

Choice (docs/ARCHITECTURE.md §4, level 1): on CUDA our fused Triton kernel where it supports the call's
shapes (SDPA otherwise, decided per call), else xformers if installed, else PyTorch SDPA. On a
machine without CUDA the Triton kernel is never selected for real work. On CPU our C kernels
(runtime/kernels/attention_cpu.py) take the calls they support: bf16 with AVX512-BF16, fp32 with AVX-512 (an
fp32 pipeline's error stays SDPA's: exact class), SDPA the rest, where they measure faster: "auto" on CPU
times our kernel against SDPA on each attention module's own call at the representative size, in the
module's dtype, and gives each module the faster (measured dispatch: runtime/optim/dispatch.py; the
report lists the times). Modules the shape probe does not reach (text encoders, whose causal mask our
kernel does not take) keep their backend. ``backend="cpu"`` takes our kernels without measuring.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from runtime.models.attention import sdpa_backend
from runtime.models.errors import OptimizationError

from . import dispatch
from .base import Pass
from .components import pipeline_device, pipeline_models

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
    """Our fp32 CPU kernel for fp32 calls, SDPA for the rest."""
    if q.dtype == torch.float32:
        return cpu_backend(q, k, v, mask)
    return sdpa_backend(q, k, v, mask)


def cpu_bf16_backend(q, k, v, mask=None):
    """Our bf16 CPU kernel for bf16 calls, SDPA for the rest."""
    if q.dtype == torch.bfloat16:
        return cpu_backend(q, k, v, mask)
    return sdpa_backend(q, k, v, mask)


OURS = {torch.bfloat16: cpu_bf16_backend, torch.float32: cpu_fp32_backend}  # ours for that dtype's calls


def _cpu_kernel_ready(dtype: torch.dtype = torch.bfloat16) -> str | None:
    from runtime.kernels.attention_cpu import cpu_attention_ready

    return cpu_attention_ready(dtype)


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def measure_call(q_shape, k_shape, masked: bool, dtype: torch.dtype) -> dispatch.Measurement:
    """Our kernel against SDPA on one call: ``q`` and ``k``/``v`` as a module makes them, head-split views
    of ``(B, T, H*D)`` projections."""
    from runtime.kernels.attention_cpu import cpu_attention_supports

    def qkv(shapes, make=torch.empty):
        # (B, H, T, D) views of (B, T, H, D) memory, as Attention._attend's head split
        return [make(b, t, h, d, dtype=dtype).transpose(1, 2) for b, h, t, d in shapes]

    shapes = (q_shape, k_shape, k_shape)
    mask = torch.zeros(q_shape[2], k_shape[2], dtype=dtype) if masked else None
    why = cpu_attention_supports(*qkv(shapes), mask)
    inputs = []

    def made():
        if not inputs:
            inputs.extend(qkv(shapes, torch.randn))
        return inputs

    candidates = [dispatch.Candidate("sdpa", lambda: sdpa_backend(*made(), mask), baseline=True)]
    if why is None:
        candidates.append(dispatch.Candidate("ours", lambda: cpu_backend(*made())))  # as the module calls it
    key = dispatch.OpKey("attention", (tuple(q_shape), tuple(k_shape), masked), str(dtype).removeprefix("torch."))
    return dispatch.measure(key, candidates, note=f"ours: {why}" if why else "")


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
    """The backend callable for ``requested`` on ``device``, and why it was chosen; None for "auto" on CPU,
    where each module's backend is measured (``AttentionPass.apply``)."""
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
        return None, "measured per module: our CPU kernels or PyTorch SDPA, the faster on each call"
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
        if backend is None:
            with dispatch.ensure_session():
                why = self._measured(pipe)
        else:
            for m in pipeline_models(pipe).values():
                for module in m.attention_modules():
                    self.log().set(module, "backend", backend)
        self._state()["why"] = why

    def _measured(self, pipe) -> str:
        """Each attention module's backend, measured on its own call; why, in words."""
        calls, tally, counts, kept = dispatch.probe(pipe), dispatch.Tally(), {}, 0
        for model_name, model in dispatch.networks(pipe):
            wanted = {id(m) for m in model.attention_modules()}
            for name, module in model.named_modules():
                if id(module) not in wanted:
                    continue
                recorded = calls.of("attention", model_name, name)
                if not recorded:
                    kept += 1
                    continue
                dtype = _dtype(module)
                choice = dispatch.choose([tally.add(measure_call(*call, dtype)) for call in recorded])
                ours = choice == "ours" and dtype in OURS
                self.log().set(module, "backend", OURS[dtype] if ours else sdpa_backend)
                label = f"our {str(dtype).removeprefix('torch.')} kernel" if ours else "PyTorch SDPA"
                counts[label] = counts.get(label, 0) + 1
        self._state()["measurements"] = tally.records()
        parts = [f"{n} on {label}" for label, n in sorted(counts.items())]
        if kept:
            parts.append(f"{kept} not reached by the shape probe keep their backend")
        text = "attention modules: " + (", ".join(parts) or "none probed")
        return text + (f"; {tally.describe()}" if tally.records() else "")

    def describe(self) -> str:
        return self._state().get("why", "")
