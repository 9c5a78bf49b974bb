"""Argument checks shared by the pipelines; each error names the argument and its value."""
from __future__ import annotations

import math

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
    if not isinstance(strength, (int, float)) or math.isnan(strength) or not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength!r}")


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
