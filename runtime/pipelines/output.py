"""What a pipeline call returns, as diffusers' output classes (``BaseOutput`` semantics).

``images``: a list of PIL images, a (B, H, W, C) array, a (B, C, H, W) tensor, or latents.
We run no safety checker, so ``nsfw_content_detected`` is None: it is then no key of the
output and ``to_tuple()`` is ``(images,)``, exactly as in diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.models.outputs import BaseOutput


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: Any


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    images: Any
    nsfw_content_detected: Any  # required, as in diffusers


@dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    images: Any
