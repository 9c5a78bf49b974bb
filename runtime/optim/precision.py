"""Reduced precision where the hardware runs it fast (near-exact class).

bf16 on CPUs with native bf16 (AVX512-BF16/AMX; detected) and on CUDA devices that support it,
fp16 on older CUDA devices. In fp16 the VAE stays fp32 when its config sets ``force_upcast``
(SD's VAE overflows in fp16; bf16 has fp32's range, so diffusers' rule upcasts for fp16 only). Latents and scheduler math stay fp32 in the pipelines; NaNs before decode
raise there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from runtime.models.errors import OptimizationError

from .base import Pass
from .components import pipeline_device, pipeline_models
from .hardware import fast_half_dtype
from .snapshot import to_dtype

DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PrecisionPass(Pass):
    name = "precision"
    exact = False
    # Documented bound: image PSNR against fp32 eager at least this, checked by tests on the tiny
    # random pipeline (10 steps; what it measured there: bench/RESULTS.md, 'Figures moved from docstrings').
    psnr_floor_db: ClassVar[float] = 35.0
    dtype: str = "auto"
    vae_fp32: str = "auto"  # "auto": fp32 for fp16 runs where the VAE says force_upcast; "always"; "never"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise OptimizationError(f"precision: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.vae_fp32 not in ("auto", "always", "never"):
            raise OptimizationError(f"precision: vae_fp32 must be auto, always or never, got {self.vae_fp32!r}")

    def target(self, pipe) -> tuple[torch.dtype | None, str]:
        if self.dtype != "auto":
            return DTYPES[self.dtype], f"{self.dtype} (requested)"
        return fast_half_dtype(pipeline_device(pipe))

    def supports(self, pipe) -> str | None:
        dtype, why = self.target(pipe)
        return why if dtype is None else None

    def _keep_fp32(self, name: str, model, dtype: torch.dtype) -> bool:
        if name != "vae":
            return False
        if self.vae_fp32 == "auto":
            return dtype == torch.float16 and bool(model.config.get("force_upcast", False))
        return self.vae_fp32 == "always"

    def apply(self, pipe) -> None:
        dtype, why = self.target(pipe)
        kept = []
        for name, model in pipeline_models(pipe).items():
            if self._keep_fp32(name, model, dtype):
                kept.append(name)
                continue
            self.log().tensors(model, lambda: to_dtype(model, dtype))  # stored conversions taken as they are
        self._state()["why"] = why + (f"; {', '.join(kept)} kept in fp32 (force_upcast)" if kept else "")

    def describe(self) -> str:
        return self._state().get("why", "")
