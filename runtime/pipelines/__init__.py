"""Pipelines with diffusers' names and call arguments, over our models and schedulers."""
from .auto import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from .base import DiffusionPipeline
from .ddpm import DDPMPipeline
from .depth2img import StableDiffusionDepth2ImgPipeline
from .img2img import StableDiffusionImg2ImgPipeline
from .inpaint import StableDiffusionInpaintPipeline
from .output import ImagePipelineOutput, StableDiffusionPipelineOutput, StableDiffusionXLPipelineOutput
from .sdxl import StableDiffusionXLPipeline
from .sdxl_tasks import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from .stable_diffusion import StableDiffusionPipeline

# _class_name in model_index.json -> class (DiffusionPipeline.from_pretrained picks from here)
PIPELINE_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        StableDiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionDepth2ImgPipeline,
        StableDiffusionXLPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        DDPMPipeline,
    )
}

__all__ = [
    "AutoPipelineForImage2Image",
    "AutoPipelineForInpainting",
    "AutoPipelineForText2Image",
    "DDPMPipeline",
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "PIPELINE_CLASSES",
    "StableDiffusionDepth2ImgPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionPipelineOutput",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLPipelineOutput",
]
