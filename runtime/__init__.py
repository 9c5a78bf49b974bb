"""diffusion-runtime: diffusers-compatible pipelines on our own fast model code.

``from runtime import StableDiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel``
works as the diffusers import does: every model, pipeline and scheduler class is re-exported.
"""
from importlib import import_module

from runtime.models import ModelMixin  # noqa: F401

from . import errors  # noqa: F401
from .pipelines import (  # noqa: F401
    PIPELINE_CLASSES,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDPMPipeline,
    DiffusionPipeline,
    ImagePipelineOutput,
    StableDiffusionDepth2ImgPipeline,
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

from runtime.optim import optimize  # noqa: F401,E402  (runtime -> optim -> models)

# Model classes live in ``runtime.models``; imported on first use so ``import runtime`` stays light.
_MODEL_CLASSES = {
    "UNet2DConditionModel": "runtime.models.unet_2d_condition",
    "UNet2DModel": "runtime.models.unet_2d",
    "AutoencoderKL": "runtime.models.vae",
    "CLIPTextModel": "runtime.models.clip",
    "CLIPTextModelWithProjection": "runtime.models.clip",
    "CLIPTokenizer": "runtime.models.tokenizer",
    "DPTForDepthEstimation": "runtime.models.dpt",
    "DPTImageProcessor": "runtime.models.dpt_image_processor",
    "DPTFeatureExtractor": "runtime.models.dpt_image_processor",
}


_SUBPACKAGES = ("models", "optim", "kernels")  # runtime.kernels etc. without an explicit import


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return import_module(f"runtime.{name}")
    if name in _MODEL_CLASSES:
        return getattr(import_module(_MODEL_CLASSES[name]), name)
    if name in PIPELINE_CLASSES:
        return PIPELINE_CLASSES[name]
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES) | set(_MODEL_CLASSES) | set(PIPELINE_CLASSES))


__version__ = "0.1.0"
