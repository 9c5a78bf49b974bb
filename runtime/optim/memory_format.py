"""channels_last for the UNet and the VAE where it is faster on the device (exact).

Decided by measurement, not habit. On the 2-core AVX512-BF16 CPU this project runs on,
``bench/bench_channels_last.py`` measured conv+GroupNorm+SiLU at UNet shapes against NCHW (slower at
512 channels on 8x8, faster at 128 channels on 32x32-64x64; measured: bench/RESULTS.md, 'Predictions
and what they gave (optimization layer, 2026-11-22)', the channels_last rows): no consistent gain in
eager mode, so "auto" leaves CPUs alone. On CUDA, cuDNN's tensor-core convolutions prefer NHWC,
so "auto" turns it on there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.models.errors import OptimizationError

from .base import Pass
from .components import pipeline_device, pipeline_models

TARGETS = ("unet", "vae")


@dataclass(frozen=True)
class MemoryFormatPass(Pass):
    name = "memory_format"
    exact = True
    channels_last: str = "auto"  # "auto" (by device, see docstring), "on", "off"

    def __post_init__(self):
        if self.channels_last not in ("auto", "on", "off"):
            raise OptimizationError(f"memory_format: channels_last must be auto, on or off, got {self.channels_last!r}")

    def supports(self, pipe) -> str | None:
        if not any(n in pipeline_models(pipe) for n in TARGETS):
            return "no unet or vae in this pipeline"
        if self.channels_last == "off":
            return "channels_last switched off"
        if self.channels_last == "auto" and pipeline_device(pipe).type != "cuda":
            return "channels_last measured no faster than NCHW on CPU (bench/bench_channels_last.py)"
        return None

    def apply(self, pipe) -> None:
        for name, model in pipeline_models(pipe).items():
            if name in TARGETS:
                self.log().tensors(model, lambda: model.to(memory_format=torch.channels_last))
