"""Which parts of a pipeline a pass works on."""
from __future__ import annotations

import torch

from runtime.models.modeling import ModelMixin

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def pipeline_models(pipe) -> dict[str, ModelMixin]:
    """The pipeline's networks by component name (tokenizers, schedulers and None left out)."""
    components = getattr(pipe, "components", None)
    if components is None:
        components = {k: v for k, v in vars(pipe).items()}
    return {name: m for name, m in components.items() if isinstance(m, ModelMixin)}


def denoiser(pipe) -> ModelMixin | None:
    models = pipeline_models(pipe)
    for name in DENOISERS:
        if name in models:
            return models[name]
    return None


def pipeline_device(pipe) -> torch.device:
    offload = getattr(pipe, "_offload_device", None)  # CPU offload: the networks rest on the CPU, run there
    if offload is not None:
        return offload
    for m in pipeline_models(pipe).values():
        return m.device
    return torch.device("cpu")
