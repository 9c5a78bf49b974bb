"""Text-to-image with SDXL: two CLIP text encoders, pooled text embeddings and size conditioning.

The UNet's extra conditioning (``addition_embed_type="text_time"``): the pooled output of the
projection text encoder, and six "time ids" (original size, crop top-left, target size).
"""
from __future__ import annotations

import torch

from runtime.models.errors import ConfigError

from .output import StableDiffusionXLPipelineOutput
from .prompts import as_list, repeat_per_image, tokenize
from .sd_base import GenerationCall, StableDiffusionBase
from .single_file import FromSingleFileMixin


def _hidden(text_encoder, ids: torch.Tensor, clip_skip: int | None):
    """(penultimate or clip_skip-earlier hidden state, pooled projection or None)."""
    out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
    pooled = out[0] if out[0].ndim == 2 else None  # CLIPTextModelWithProjection: text_embeds (B, D)
    return out.hidden_states[-(clip_skip + 2) if clip_skip else -2], pooled


class StableDiffusionXLPipeline(FromSingleFileMixin, StableDiffusionBase):
    """prompt -> image with SDXL; arguments and defaults as diffusers' StableDiffusionXLPipeline."""

    component_names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
                       "image_encoder", "feature_extractor")
    optional_components = ("tokenizer", "text_encoder", "image_encoder", "feature_extractor")
    config_defaults = {"force_zeros_for_empty_prompt": True}
    callback_tensor_names = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")
    conditioning_names = ("prompt_embeds", "negative_prompt_embeds", "add_text_embeds", "add_time_ids")
    fix_legacy_scheduler = False
    time_ids_grouped = False  # how guidance orders the time ids (diffusers differs between its SDXL tasks)

    @staticmethod
    def _output(images, return_dict: bool):
        """diffusers' SDXL pipelines have no NSFW slot: ``(images,)`` or an output with ``images``."""
        return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

    def _encoders(self):
        if self.tokenizer is not None and self.text_encoder is not None:
            return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(self.tokenizer_2, self.text_encoder_2)]

    def _encode_prompts(self, call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, extra) -> None:
        n, batch, clip_skip = call.num_images_per_prompt, call.batch_size, extra.get("clip_skip")
        pooled, negative_pooled = extra.get("pooled_prompt_embeds"), extra.get("negative_pooled_prompt_embeds")
        pairs = self._encoders()
        if prompt_embeds is None:
            texts = [as_list(prompt, batch), as_list(extra.get("prompt_2") or prompt, batch)][: len(pairs)]
            names = ["prompt", "prompt_2" if extra.get("prompt_2") else "prompt"][: len(pairs)]
            parts = []
            for text, what, (tokenizer, encoder) in zip(texts, names, pairs):
                hidden, pool = _hidden(encoder, tokenize(tokenizer, text, what=what), clip_skip)
                pooled = pool if pooled is None and pool is not None else pooled
                parts.append(hidden)
            prompt_embeds = torch.cat(parts, dim=-1)  # (B, T, C1 + C2)
        if pooled is None:
            raise ConfigError("SDXL needs pooled text embeddings: pass pooled_prompt_embeds with prompt_embeds")
        zero_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        if call.do_cfg and negative_prompt_embeds is None and zero_negative:
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled = torch.zeros_like(pooled)
        elif call.do_cfg and negative_prompt_embeds is None:
            negative = negative_prompt or ""
            negatives = [as_list(negative, batch), as_list(extra.get("negative_prompt_2") or negative, batch)]
            names = ["negative_prompt", "negative_prompt_2" if extra.get("negative_prompt_2") else "negative_prompt"]
            parts = []
            # zip: a refiner (text_encoder_2 only) reads negative_prompt, as in diffusers
            for text, what, (tokenizer, encoder) in zip(negatives, names, pairs):
                ids = tokenize(tokenizer, text, max_length=prompt_embeds.shape[1], what=what)
                hidden, pool = _hidden(encoder, ids, None)
                negative_pooled = pool if negative_pooled is None and pool is not None else negative_pooled
                parts.append(hidden)
            negative_prompt_embeds = torch.cat(parts, dim=-1)

        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        device = call.device
        prompt_embeds = repeat_per_image(prompt_embeds.to(device=device, dtype=dtype), n)
        pooled = repeat_per_image(pooled.to(device), n)
        positive_ids, negative_ids = self._time_id_pair(call, extra, pooled, prompt_embeds.dtype)
        if call.do_cfg:
            negative_prompt_embeds = repeat_per_image(negative_prompt_embeds.to(device=device, dtype=dtype), n)
            negative_pooled = repeat_per_image(negative_pooled.to(device), n)
            call.state["negative_prompt_embeds"] = negative_prompt_embeds
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
        call.state["prompt_embeds"] = prompt_embeds
        call.state["add_text_embeds"] = pooled
        total = call.total
        if not call.do_cfg:
            time_ids = positive_ids.repeat(total, 1)
        elif self.time_ids_grouped:  # (2B, 6) as [negatives..., positives...]
            time_ids = torch.cat([negative_ids.repeat(total, 1), positive_ids.repeat(total, 1)])
        else:  # (2B, 6) as [negative, positive] pairs
            time_ids = torch.cat([negative_ids, positive_ids]).repeat(total, 1)
        call.state["add_time_ids"] = time_ids.to(device)

    def _time_id_pair(self, call: GenerationCall, extra: dict, pooled, dtype):
        """(positive, negative) time ids, each (1, 6): original size, crop top-left, target size."""
        size = (call.height, call.width)
        original = tuple(extra.get("original_size") or size)
        target = tuple(extra.get("target_size") or size)
        positive = list(original + tuple(extra.get("crops_coords_top_left") or (0, 0)) + target)
        negative = positive
        if extra.get("negative_original_size") is not None and extra.get("negative_target_size") is not None:
            negative = list(tuple(extra["negative_original_size"])
                            + tuple(extra.get("negative_crops_coords_top_left") or (0, 0))
                            + tuple(extra["negative_target_size"]))
        return self._check_time_ids(positive, pooled, dtype), self._check_time_ids(negative, pooled, dtype)

    def _check_time_ids(self, ids: list, pooled, dtype) -> torch.Tensor:
        """The ids as a (1, n) tensor, their embedded size checked against the UNet's config."""
        projection = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else pooled.shape[-1]
        given = self.unet.config.addition_time_embed_dim * len(ids) + projection
        expected = self.unet.config.projection_class_embeddings_input_dim
        if expected != given:
            raise ConfigError(
                f"the UNet expects added conditioning of size {expected} (projection_class_embeddings_input_dim) "
                f"but {len(ids)} time ids x addition_time_embed_dim + text projection_dim {projection} = {given}"
                + ("; check requires_aesthetics_score" if "requires_aesthetics_score" in self.config else "")
            )
        return torch.tensor([ids], dtype=dtype)

    def _unet_kwargs(self, call: GenerationCall):
        timestep_cond = call.state.get("timestep_cond")

        def kwargs(state: dict) -> dict:
            out = {"encoder_hidden_states": state["prompt_embeds"],
                   "added_cond_kwargs": {"text_embeds": state["add_text_embeds"], "time_ids": state["add_time_ids"]}}
            if timestep_cond is not None:
                out["timestep_cond"] = timestep_cond
            return out

        return kwargs

    def __call__(
        self,
        prompt=None,
        prompt_2=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 5.0,
        negative_prompt=None,
        negative_prompt_2=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        original_size=None,
        crops_coords_top_left=(0, 0),
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=(0, 0),
        negative_target_size=None,
        clip_skip: int | None = None, cross_attention_kwargs=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        extra = dict(
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        return self._generate(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            guidance_rescale=guidance_rescale, timesteps=timesteps, sigmas=sigmas, extra=extra,
        )
