"""What a pipeline call returns: images (and, like diffusers, an NSFW flag slot kept as None)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, a (B, H, W, C) array, a (B, C, H, W) tensor, or latents."""

    images: Any

    def __getitem__(self, index):
        return self.to_tuple()[index]

    def to_tuple(self) -> tuple:
        return (self.images,)


@dataclass
class StableDiffusionPipelineOutput(ImagePipelineOutput):
    """diffusers' output type; we run no safety checker, so ``nsfw_content_detected`` is None."""

    nsfw_content_detected: Any = None

    def to_tuple(self) -> tuple:
        return (self.images, self.nsfw_content_detected)
