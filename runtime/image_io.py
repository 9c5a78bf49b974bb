"""Image and mask conversions between PIL, numpy and torch, with diffusers' conventions.

Images enter the VAE as (B, C, H, W) float tensors in [-1, 1]; masks as (B, 1, H, W) in {0, 1}
(1 = repaint). PIL inputs are resized with Lanczos to a multiple of the VAE factor, tensors and
arrays with nearest interpolation, as diffusers' VaeImageProcessor does.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from runtime.models.errors import InputError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an array (H, W[, C]) / (B, H, W, C), or a tensor (.., H, W)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("image: got an empty list")
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        if image.ndim == 4:
            return image.shape[1], image.shape[2]
        return image.shape[0], image.shape[1]
    if isinstance(image, torch.Tensor):
        return image.shape[-2], image.shape[-1]
    raise InputError(f"image: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")


def _round_size(image, height: int | None, width: int | None, factor: int) -> tuple[int, int]:
    h, w = image_size(image)
    height = h if height is None else height
    width = w if width is None else width
    return height - height % factor, width - width % factor


def _pil_batch(images: list[PIL.Image.Image], height: int, width: int, grayscale: bool) -> torch.Tensor:
    arrays = []
    for im in images:
        im = im.resize((width, height), resample=PIL.Image.LANCZOS)
        if grayscale:
            im = im.convert("L")
        elif im.mode != "RGB":
            # RGBA, CMYK, L, P...: what the VAE takes is RGB. Left as they are, a 4-channel image would
            # pass for latents and skip the encoder; a 1-channel one would fail inside the VAE.
            im = im.convert("RGB")
        arrays.append(np.array(im).astype(np.float32) / 255.0)
    batch = np.stack(arrays, axis=0)
    if batch.ndim == 3:  # (B, H, W) -> (B, H, W, 1)
        batch = batch[..., None]
    return torch.from_numpy(batch.transpose(0, 3, 1, 2))  # (B, C, H, W)


def _array_batch(images: list[np.ndarray]) -> torch.Tensor:
    if images[0].ndim == 4:
        batch = np.concatenate(images, axis=0)
    else:
        batch = np.stack(images, axis=0)
    if batch.ndim == 3:  # (B, H, W) single-channel images and masks -> (B, H, W, 1)
        batch = batch[..., None]
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()  # (B, C, H, W)


def _tensor_batch(images: list[torch.Tensor], grayscale: bool) -> torch.Tensor:
    if images[0].ndim == 4:
        batch = torch.cat(images, dim=0)
    else:
        batch = torch.stack(images, dim=0)
    if grayscale and batch.ndim == 3:  # (B, H, W) -> (B, 1, H, W)
        batch = batch.unsqueeze(1)
    return batch


def to_batch(image, height=None, width=None, *, factor: int = 8, grayscale: bool = False,
             latent_channels: int | None = None) -> torch.Tensor:
    """Any supported image input -> (B, C, H, W) float tensor in [0, 1] (or latents as given)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise InputError("image: got an empty list")
    kind = type(items[0])
    if not all(isinstance(x, kind) for x in items):
        raise InputError("image: a list must hold one kind of image (all PIL, all numpy or all torch)")
    height, width = _round_size(items[0], height, width, factor)
    if isinstance(items[0], PIL.Image.Image):
        return _pil_batch(items, height, width, grayscale)
    if isinstance(items[0], np.ndarray):
        batch = _array_batch(items)
    elif isinstance(items[0], torch.Tensor):
        batch = _tensor_batch(items, grayscale)
        if latent_channels is not None and batch.shape[1] == latent_channels and not grayscale:
            return batch  # already latents: the pipeline skips the VAE encoder
    else:
        raise InputError(f"image: expected a PIL image, numpy array or torch tensor, got {kind.__name__}")
    return F.interpolate(batch, size=(height, width))


def preprocess_image(image, height=None, width=None, *, factor: int = 8, latent_channels: int = 4) -> torch.Tensor:
    """An image for the VAE encoder: (B, 3, H, W) in [-1, 1], H and W multiples of ``factor``."""
    batch = to_batch(image, height, width, factor=factor, latent_channels=latent_channels)
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, torch.Tensor) and batch.shape[1] == latent_channels:
        return batch
    if batch.min() < 0:  # already in [-1, 1] (diffusers accepts this, with a deprecation warning)
        return batch
    return 2.0 * batch - 1.0


def preprocess_mask(mask, height=None, width=None, *, factor: int = 8) -> torch.Tensor:
    """An inpainting mask: (B, 1, H, W) with 1 where the image is repainted, 0 where it is kept."""
    batch = to_batch(mask, height, width, factor=factor, grayscale=True)
    if batch.shape[1] != 1:
        raise InputError(f"mask_image: expected one channel, got shape {tuple(batch.shape)}")
    batch = batch.clone()
    batch[batch < 0.5] = 0
    batch[batch >= 0.5] = 1
    return batch


def tensor_to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) tensor -> (B, H, W, C) float32 array."""
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8 (rounded half to even, clipped), the 8 bits a PIL image holds."""
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> list of PIL images (rounded to 8 bits)."""
    if images.ndim == 3:
        images = images[None]
    images = to_uint8(images)
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(im.squeeze(-1), mode="L") for im in images]
    return [PIL.Image.fromarray(im) for im in images]


def postprocess(images: torch.Tensor, output_type: str = "pil"):
    """Decoded VAE output in [-1, 1] -> images of ``output_type`` (pil / np / pt / latent)."""
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "latent":
        return images
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = tensor_to_numpy(images)
    if output_type == "np":
        return array
    return numpy_to_pil(array)

