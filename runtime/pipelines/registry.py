"""The one table from model_index.json class names to our classes, and back to libraries.

model_index.json names each component as [library, class]; we map the class name to our own
implementation. Names we do not implement (safety checker, CLIP image processor) map to None, and
the pipeline loads without them.
"""
from __future__ import annotations

import importlib

# class name in model_index.json -> (our module, our class, library written back on save)
MODEL_CLASSES: dict[str, tuple[str, str, str]] = {
    "UNet2DConditionModel": ("runtime.models.unet_2d_condition", "UNet2DConditionModel", "diffusers"),
    "UNet2DModel": ("runtime.models.unet_2d", "UNet2DModel", "diffusers"),
    "AutoencoderKL": ("runtime.models.vae", "AutoencoderKL", "diffusers"),
    "CLIPTextModel": ("runtime.models.clip", "CLIPTextModel", "transformers"),
    "CLIPTextModelWithProjection": ("runtime.models.clip", "CLIPTextModelWithProjection", "transformers"),
    "CLIPTokenizer": ("runtime.models.tokenizer", "CLIPTokenizer", "transformers"),
    "CLIPTokenizerFast": ("runtime.models.tokenizer", "CLIPTokenizer", "transformers"),
    # depth-to-image: the depth estimator and its image processor (feature_extractor/preprocessor_config.json)
    "DPTForDepthEstimation": ("runtime.models.dpt", "DPTForDepthEstimation", "transformers"),
    "DPTImageProcessor": ("runtime.models.dpt_image_processor", "DPTImageProcessor", "transformers"),
    "DPTImageProcessorPil": ("runtime.models.dpt_image_processor", "DPTImageProcessor", "transformers"),
    "DPTFeatureExtractor": ("runtime.models.dpt_image_processor", "DPTImageProcessor", "transformers"),
}

# Components we knowingly run without; loading warns once, naming them.
UNSUPPORTED_OPTIONAL = {
    "StableDiffusionSafetyChecker": "the NSFW safety checker is not implemented; images are not filtered",
    "CLIPImageProcessor": "the feature extractor only feeds the safety checker / IP-adapter, which are not implemented",
    "CLIPFeatureExtractor": "the feature extractor only feeds the safety checker, which is not implemented",
    "CLIPVisionModelWithProjection": "image encoders (IP-adapter) are not implemented",
}


def model_class(name: str):
    """Our class for a model_index.json class name (models or schedulers), or None if unknown."""
    if name in MODEL_CLASSES:
        module, attr, _ = MODEL_CLASSES[name]
        return getattr(importlib.import_module(module), attr)
    from runtime.schedulers import SCHEDULER_CLASSES

    return SCHEDULER_CLASSES.get(name)


def library_of(obj) -> str:
    """The library diffusers expects for this component in model_index.json."""
    name = type(obj).__name__
    if name in MODEL_CLASSES:
        return MODEL_CLASSES[name][2]
    return "diffusers"


def pipeline_classes() -> dict[str, type]:
    """Pipeline class name -> class, for ``_class_name`` in model_index.json."""
    from . import PIPELINE_CLASSES

    return PIPELINE_CLASSES
