"""Prompt encoding with CLIP: tokenize (warning on truncation), encode, repeat per image."""
from __future__ import annotations

import logging

import torch

from .textual_inversion import expand_prompts

logger = logging.getLogger(__name__)


def tokenize(tokenizer, texts: list[str], max_length: int | None = None, warn: bool = True,
             what: str = "prompt") -> torch.Tensor:
    """(B, max_length) token ids, padded; a text longer than the limit is cut, with a warning.

    The warning quotes what was cut as diffusers does: the tokens between the limit and <eos>,
    decoded, one entry per text that was cut. ``what`` names the argument ("negative_prompt",
    "prompt_2", ...) in the message; for ``prompt`` it is diffusers' message word for word.
    """
    limit = max_length or tokenizer.model_max_length
    texts = expand_prompts(tokenizer, texts)  # multi-vector textual inversion tokens, as diffusers converts them
    ids = tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    if warn:
        removed = []
        for text in texts:
            full = tokenizer([text], padding="longest", return_tensors="pt").input_ids[0]
            if full.shape[-1] > limit:
                removed.append(tokenizer.decode(full[limit - 1 : -1]))
        if removed:
            logger.warning(
                "The following part of your input%s was truncated because CLIP can only handle sequences up to "
                "%d tokens: %s",
                "" if what == "prompt" else f" ({what})",
                limit,
                removed,
            )
    return ids


def repeat_per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """(B, ...) -> (B * n, ...), each prompt's rows kept together as diffusers orders them."""
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)


def as_list(text: str | list[str], batch_size: int) -> list[str]:
    return [text] * batch_size if isinstance(text, str) else list(text)


def encode_clip(text_encoder, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Last hidden state (SD 1.x/2.x), or ``clip_skip`` layers earlier through the final norm."""
    device = text_encoder.device
    if clip_skip is None:
        return text_encoder(ids.to(device))[0]
    out = text_encoder(ids.to(device), output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    return text_encoder.text_model.final_layer_norm(hidden)


def encode_sd_prompt(
    tokenizer,
    text_encoder,
    prompt,
    negative_prompt,
    batch_size: int,
    *,
    device,
    dtype,
    num_images_per_prompt: int,
    do_cfg: bool,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(positive, negative) embeddings, each (B * n, T, C); negative is None without guidance."""
    if prompt_embeds is None:
        ids = tokenize(tokenizer, as_list(prompt, batch_size))
        prompt_embeds = encode_clip(text_encoder, ids, clip_skip)
    prompt_embeds = repeat_per_image(prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
    if not do_cfg:
        return prompt_embeds, None
    if negative_prompt_embeds is None:
        negative = as_list(negative_prompt if negative_prompt is not None else "", batch_size)
        ids = tokenize(tokenizer, negative, max_length=prompt_embeds.shape[1], what="negative_prompt")
        negative_prompt_embeds = text_encoder(ids.to(text_encoder.device))[0]
    negative_prompt_embeds = repeat_per_image(negative_prompt_embeds.to(device=device, dtype=dtype), num_images_per_prompt)
    return prompt_embeds, negative_prompt_embeds
