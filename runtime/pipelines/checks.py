"""Argument checks shared by the pipelines; each error names the argument and its value."""
from __future__ import annotations

import math
import numbers
import os

import torch

from runtime.models.errors import InputError


def check_size(height: int, width: int, factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
        if value % factor:
            raise InputError(
                f"{name}={value} is not a multiple of the VAE factor {factor}; "
                f"use {value - value % factor or factor} or {value + factor - value % factor}"
            )


def check_steps(num_inference_steps) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")


def check_strength(strength) -> None:
    # numbers.Real: Python and NumPy scalars (diffusers accepts np.float32 too); NaN fails the range test
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength!r}")


def check_finite_number(name: str, value) -> None:
    """A scalar argument (guidance_scale, eta, ...) must be a finite real number: NaN compares False
    with everything, so it would silently switch guidance off or poison the latents."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")


def prompt_batch_size(prompt, prompt_embeds, name: str = "prompt") -> int:
    if prompt is not None and prompt_embeds is not None:
        raise InputError(f"pass either {name} or {name}_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise InputError(f"pass {name} (a string or a list of strings) or {name}_embeds")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise InputError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
        return len(prompt)
    if prompt is not None:
        raise InputError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")
    return prompt_embeds.shape[0]


def check_negative_prompt(prompt, negative_prompt, batch_size: int, negative_prompt_embeds=None, prompt_embeds=None) -> None:
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InputError("pass either negative_prompt or negative_prompt_embeds, not both")
    if isinstance(negative_prompt, list):
        if len(negative_prompt) != batch_size:
            raise InputError(
                f"negative_prompt has batch size {len(negative_prompt)} but prompt has batch size {batch_size}: "
                f"negative_prompt={negative_prompt!r}, prompt={prompt!r}"
            )
    elif negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InputError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise InputError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )


def check_generators(generator, batch_size: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise InputError(
            f"got {len(generator)} generators for an effective batch size of {batch_size} "
            "(prompts x num_images_per_prompt); pass one generator or one per image"
        )


def check_finite(latents: torch.Tensor, where: str) -> None:
    """NaN or inf latents would decode to a black or noisy image: fail loudly instead."""
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise InputError(
            f"{where}: the latents hold {bad} NaN/inf values of {latents.numel()} before decoding "
            f"(dtype {latents.dtype}); this usually means fp16 overflow: try dtype=torch.float32 or bfloat16"
        )


# ---- the size of a request against the memory there is ----------------------------------------------

MAX_BYTES_UNMEASURED = 256 * 2**30  # the bound where the available memory cannot be read


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes free for a new allocation, where the number comes from); (None, why) when unknown."""
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable
            return int(free + cached), f"free memory on {device} (torch.cuda.mem_get_info + cached blocks)"
        except Exception as e:  # noqa: BLE001 - no reading is an answer too
            return None, f"torch.cuda.mem_get_info failed: {e}"
    if device.type != "cpu":
        return None, f"no memory reading for device type {device.type!r}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, f"no /proc/meminfo MemAvailable on this system ({os.name})"


def generation_bytes(*, images: int, height: int, width: int, factor: int, latent_channels: int,
                     vae_block_out_channels, vae_itemsize: int, decode: bool, decode_images: int | None = None,
                     decode_size: tuple[int, int] | None = None) -> tuple[int, int, str]:
    """(latent bytes, decode bytes, how they were estimated) for ``images`` images of height x width.

    Latents: fp32, ``images`` x channels x (H/f) x (W/f), counted 4 times (the latents, their
    doubled copy for guidance, the noise prediction and the scheduler's new sample).
    Decode: the VAE decoder's widest full-resolution activation (the channels entering its last
    up block, ``block_out_channels[1]``, after the final upsampling) x 3 (the input, its normalized
    copy and a convolution's output are alive together), for the whole batch at once. The UNet's
    own activations live at latent resolution and are smaller; weights are loaded already.
    ``decode_images`` (VAE slicing: 1) and ``decode_size`` (VAE tiling: one tile's height and width)
    bound what one decoder call holds; the decoded image itself is counted then (3 channels, fp32).
    """
    latent_one = latent_channels * (height // factor) * (width // factor) * 4
    latents = 4 * images * latent_one
    widest = max(list(vae_block_out_channels)[:2])
    n = images if decode_images is None else min(images, decode_images)
    dh, dw = decode_size if decode_size is not None else (height, width)
    decode_bytes = 3 * n * widest * dh * dw * vae_itemsize if decode else 0
    if decode and (n != images or (dh, dw) != (height, width)):
        decode_bytes += 2 * images * 3 * height * width * 4  # the tiles / slices and their concatenation
    basis = (f"latents: 4 x {images} x {latent_channels} x {height // factor} x {width // factor} fp32"
             + (f"; VAE decode: 3 x {n} x {widest} channels x {dh} x {dw} x {vae_itemsize} bytes "
                "(its widest full-resolution activation, 3 alive at once"
                + (", per slice / tile" if (n, dh, dw) != (images, height, width) else "") + ")" if decode else ""))
    return latents, decode_bytes, basis


def check_memory(*, height: int, width: int, images: int, factor: int, latent_channels: int,
                 vae_block_out_channels, vae_itemsize: int, decode: bool, device: torch.device,
                 decode_images: int | None = None, decode_size: tuple[int, int] | None = None) -> None:
    """Refuse, before allocating anything, a size whose estimated need exceeds the memory there is."""
    latents, decode_bytes, basis = generation_bytes(
        images=images, height=height, width=width, factor=factor, latent_channels=latent_channels,
        vae_block_out_channels=vae_block_out_channels, vae_itemsize=vae_itemsize, decode=decode,
        decode_images=decode_images, decode_size=decode_size)
    need = latents + decode_bytes
    available, source = available_memory(device)
    limit, against = (available, f"{_gib(available)} available ({source})") if available is not None else (
        MAX_BYTES_UNMEASURED, f"the {_gib(MAX_BYTES_UNMEASURED)} bound used when memory cannot be read ({source})")
    if need > limit:
        raise InputError(
            f"height={height}, width={width} for {images} image(s) needs about {_gib(need)}, more than "
            f"{against}; ask for a smaller size or fewer images. Estimate: latents {_gib(latents)} + "
            f"VAE decode {_gib(decode_bytes)} ({basis})"
        )
