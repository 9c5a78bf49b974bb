"""diffusion-runtime: diffusers-compatible pipelines on our own fast model code.

``from runtime import StableDiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel``
works as the diffusers import does: every model, pipeline and scheduler class is re-exported.
"""
from importlib import import_module

from models import ModelMixin  # noqa: F401

from . import errors  # noqa: F401
from .pipelines import (  # noqa: F401
    PIPELINE_CLASSES,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDPMPipeline,
    DiffusionPipeline,
    ImagePipelineOutput,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionPipelineOutput,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from .schedulers import SCHEDULER_CLASSES, SchedulerMixin  # noqa: F401
from .schedulers import *  # noqa: F401,F403  (every scheduler class by its diffusers name)

from optim import optimize  # noqa: F401,E402  (runtime -> optim -> models)

# Model classes live in ``models``; imported on first use so ``import runtime`` stays light.
_MODEL_CLASSES = {
    "UNet2DConditionModel": "models.unet_2d_condition",
    "UNet2DModel": "models.unet_2d",
    "AutoencoderKL": "models.vae",
    "CLIPTextModel": "models.clip",
    "CLIPTextModelWithProjection": "models.clip",
    "CLIPTokenizer": "models.tokenizer",
}


def __getattr__(name: str):
    if name in _MODEL_CLASSES:
        return getattr(import_module(_MODEL_CLASSES[name]), name)
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODEL_CLASSES) | set(PIPELINE_CLASSES))


__version__ = "0.1.0"
