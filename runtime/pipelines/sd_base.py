"""What the Stable Diffusion pipelines share: components, one call's flow, guidance, decoding.

``_generate`` is the whole call; a task (text-to-image, image-to-image, inpainting, SDXL)
changes it only through the hooks ``_task_size``, ``_prepare_latents``, ``_encode_prompts``
and ``_unet_kwargs``, and through ``call.model_input`` / ``call.after_step`` for the loop.
Everything a call computes lives on its ``GenerationCall``, never on the pipeline, so
concurrent calls share nothing mutable.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from runtime.models.errors import InputError
from runtime.models.noise import randn_tensor
from runtime.image_io import OUTPUT_TYPES, postprocess
from runtime.lora.pipeline_mixin import StableDiffusionLoraLoaderMixin
from runtime.lora.state import call_scale

from .base import DiffusionPipeline
from .checks import (
    check_finite_number,
    check_generators,
    check_memory,
    check_negative_prompt,
    check_size,
    check_steps,
    prompt_batch_size,
)
from .denoise import denoise, step_kwargs
from .output import StableDiffusionPipelineOutput
from .prompts import encode_sd_prompt
from .textual_inversion import TextualInversionLoaderMixin
from .vae_codec import decode_latents, needs_upcast, vae_scale_factor

logger = logging.getLogger(__name__)


@dataclass
class GenerationCall:
    """One call's private state: its scheduler copy, tensors, and the loop hooks it needs."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int  # prompts
    num_images_per_prompt: int
    generator: Any
    scheduler: Any
    do_cfg: bool
    height: int | None
    width: int | None
    num_inference_steps: int
    args: dict  # the task's own arguments (image, mask_image, strength, ...)
    state: dict = field(default_factory=dict)  # named tensors, visible to callbacks
    model_input: Callable | None = None
    after_step: Callable | None = None

    @property
    def total(self) -> int:
        return self.batch_size * self.num_images_per_prompt


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of (guidance_scale - 1) for guidance-distilled UNets (time_cond_proj_dim)."""
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def fresh_scheduler(scheduler):
    """A private copy for one call (diffusers' schedulers, lacking fresh_copy, are deep-copied)."""
    return scheduler.fresh_copy() if hasattr(scheduler, "fresh_copy") else copy.deepcopy(scheduler)


class StableDiffusionBase(StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin, DiffusionPipeline):
    """Components and call flow of SD 1.x/2.x pipelines (the SDXL class overrides the text side).

    LoRA: diffusers' ``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ... (runtime/lora/pipeline_mixin.py);
    ``cross_attention_kwargs={"scale": s}`` scales the unfused adapters of the text encoders and the UNet
    for that call. Textual inversion: ``load_textual_inversion`` / ``unload_textual_inversion``
    (runtime/pipelines/textual_inversion.py).
    """

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler",
                       "safety_checker", "feature_extractor", "image_encoder")
    optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    config_defaults = {"requires_safety_checker": True}
    callback_tensor_names = ("latents", "prompt_embeds", "negative_prompt_embeds")
    conditioning_names = ("prompt_embeds", "negative_prompt_embeds")  # cast to unet.dtype before the loop
    fix_legacy_scheduler = True  # SD 1.x folders with steps_offset=0 / clip_sample=True, as diffusers fixes them
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = getattr(self.scheduler, "config", None) or {}
        fixes = {}
        if self.fix_legacy_scheduler and config.get("steps_offset", 1) != 1:
            fixes["steps_offset"] = 1
        if self.fix_legacy_scheduler and config.get("clip_sample") is True:
            fixes["clip_sample"] = False
        if fixes:
            logger.warning("%s: outdated scheduler config, using %s as diffusers does", type(self).__name__, fixes)
            self.scheduler = type(self.scheduler).from_config({**config, **fixes})

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def _execution_device(self) -> torch.device:
        offload = self.__dict__.get("_offload_device")
        return offload if offload is not None else self.unet.device

    # ---- deprecated VAE aliases (diffusers moved them to the VAE: pipe.vae.enable_slicing() ...) ----
    def _vae_alias(self, name: str, target: str) -> None:
        warnings.warn(f"Calling `{name}()` on a `{type(self).__name__}` is deprecated and will be removed in a "
                      f"future version; use `pipe.vae.{target}()` instead.", FutureWarning, stacklevel=3)
        getattr(self.vae, target)()

    def enable_vae_slicing(self) -> None:
        """Deprecated: ``pipe.vae.enable_slicing()``."""
        self._vae_alias("enable_vae_slicing", "enable_slicing")

    def disable_vae_slicing(self) -> None:
        """Deprecated: ``pipe.vae.disable_slicing()``."""
        self._vae_alias("disable_vae_slicing", "disable_slicing")

    def enable_vae_tiling(self) -> None:
        """Deprecated: ``pipe.vae.enable_tiling()``."""
        self._vae_alias("enable_vae_tiling", "enable_tiling")

    def disable_vae_tiling(self) -> None:
        """Deprecated: ``pipe.vae.disable_tiling()``."""
        self._vae_alias("disable_vae_tiling", "disable_tiling")

    def default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    # ---- hooks a task overrides --------------------------------------------------------
    def _task_size(self, height, width, args) -> tuple[int, int]:
        default_h, default_w = self.default_size()
        return height or default_h, width or default_w

    def _check_task(self, args) -> None:
        pass

    def _prepare_latents(self, call: GenerationCall, latents: torch.Tensor | None, timesteps: torch.Tensor):
        """Text-to-image: scaled noise (or the caller's latents). Returns (timesteps, steps)."""
        channels = self.unet.config.in_channels
        shape = (call.total, channels, call.height // self.vae_scale_factor, call.width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, call.generator, device=call.device, dtype=call.dtype)
        else:
            if tuple(latents.shape) != shape:
                raise InputError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=call.device, dtype=call.dtype)
        call.state["latents"] = latents * call.scheduler.init_noise_sigma
        return timesteps, call.num_inference_steps

    def _encode_prompts(self, call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, extra) -> None:
        """Fill call.state with prompt_embeds (guidance-ordered [negative, positive]) and negatives."""
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        positive, negative = encode_sd_prompt(
            self.tokenizer, self.text_encoder, prompt, negative_prompt, call.batch_size,
            device=call.device, dtype=dtype, num_images_per_prompt=call.num_images_per_prompt,
            do_cfg=call.do_cfg, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=extra.get("clip_skip"),
        )
        call.state["negative_prompt_embeds"] = negative
        call.state["prompt_embeds"] = torch.cat([negative, positive]) if call.do_cfg else positive

    def _unet_kwargs(self, call: GenerationCall) -> Callable[[dict], dict]:
        """The UNet's conditioning arguments for one step, read from the (callback-editable) state."""
        timestep_cond = call.state.get("timestep_cond")

        def kwargs(state: dict) -> dict:
            out = {"encoder_hidden_states": state["prompt_embeds"]}
            if timestep_cond is not None:
                out["timestep_cond"] = timestep_cond
            return out

        return kwargs

    def _check_memory(self, height: int, width: int, images: int, decode: bool) -> None:
        """Before any allocation: the size asked against the memory of the device it runs on."""
        vae = self.vae
        itemsize = 4 if vae is None or needs_upcast(vae) else vae.dtype.itemsize
        decode_size = None
        if vae is not None and getattr(vae, "use_tiling", False):
            tile = int(vae.tile_sample_min_size)
            decode_size = (min(height, tile), min(width, tile))
        check_memory(
            decode_images=1 if vae is not None and getattr(vae, "use_slicing", False) else None,
            decode_size=decode_size,
            height=height, width=width, images=images, factor=self.vae_scale_factor,
            latent_channels=vae.config.latent_channels if vae is not None else self.unet.config.in_channels,
            vae_block_out_channels=vae.config.block_out_channels if vae is not None else (128, 256),
            vae_itemsize=itemsize, decode=decode and vae is not None, device=self._execution_device,
        )

    # ---- the call ---------------------------------------------------------------------
    @torch.no_grad()
    def _generate(
        self, *, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
        num_inference_steps, guidance_scale, num_images_per_prompt, eta, generator, latents, output_type,
        return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, guidance_rescale=0.0,
        timesteps=None, sigmas=None, args=None, extra=None,
    ):
        args, extra = args or {}, extra or {}
        check_steps(num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        names = tuple(callback_on_step_end_tensor_inputs or ())
        unknown = [n for n in names if n not in self.callback_tensor_names]
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs {unknown} are not in {list(self.callback_tensor_names)}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        for name, value in (("guidance_scale", guidance_scale), ("eta", eta), ("guidance_rescale", guidance_rescale)):
            check_finite_number(name, value)
        self._check_task(args)
        height, width = self._task_size(height, width, args)
        if height is not None:
            check_size(height, width, self.vae_scale_factor)
        batch_size = prompt_batch_size(prompt, prompt_embeds)
        check_negative_prompt(prompt, negative_prompt, batch_size, negative_prompt_embeds, prompt_embeds)
        check_generators(generator, batch_size * num_images_per_prompt)
        if height is not None:
            self._check_memory(height, width, batch_size * num_images_per_prompt, output_type != "latent")

        do_cfg = guidance_scale > 1.0 and self.unet.config.get("time_cond_proj_dim") is None
        call = GenerationCall(
            device=self._execution_device, dtype=torch.float32, batch_size=batch_size,
            num_images_per_prompt=num_images_per_prompt, generator=generator,
            scheduler=fresh_scheduler(self.scheduler), do_cfg=do_cfg, height=height, width=width,
            num_inference_steps=num_inference_steps, args=args,
        )
        cross_attention_kwargs = extra.get("cross_attention_kwargs")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise InputError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}")
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        if lora_scale is not None:
            check_finite_number("cross_attention_kwargs['scale']", lora_scale)
        self._set_call_lora_scale(lora_scale)
        self._offload_phase("text_encoder", "text_encoder_2")
        # the call-time LoRA scale reaches the text encoders for this call (this thread); the UNet takes
        # it from cross_attention_kwargs itself (UNet2DConditionModel.__call__)
        with call_scale([getattr(self, "text_encoder", None), getattr(self, "text_encoder_2", None)], lora_scale):
            self._encode_prompts(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, extra)
        # dtype rule: latents and scheduler math stay fp32; conditioning is cast to the UNet's dtype once
        unet_dtype = self.unet.dtype
        for key in self.conditioning_names:
            if call.state.get(key) is not None:
                call.state[key] = call.state[key].to(unet_dtype)
        if self.unet.config.get("time_cond_proj_dim") is not None:
            w = torch.tensor(guidance_scale - 1).repeat(call.total)
            call.state["timestep_cond"] = guidance_scale_embedding(
                w, self.unet.config.time_cond_proj_dim).to(device=call.device, dtype=unet_dtype)

        schedule = self._set_timesteps(call.scheduler, num_inference_steps, call.device, timesteps, sigmas)
        call.num_inference_steps = num_inference_steps if timesteps is None and sigmas is None else len(schedule)
        schedule, steps = self._prepare_latents(call, latents, schedule)

        self._offload_phase("unet")
        unet_kwargs = self._unet_kwargs(call)
        if cross_attention_kwargs:
            task_kwargs = unet_kwargs

            def unet_kwargs(state: dict) -> dict:
                return {**task_kwargs(state), "cross_attention_kwargs": cross_attention_kwargs}
        denoise(
            self, call.scheduler, call.state, schedule, steps, do_cfg=do_cfg, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, extra_step_kwargs=step_kwargs(call.scheduler, generator, eta),
            unet_kwargs=unet_kwargs, model_input=call.model_input, after_step=call.after_step,
            callback_on_step_end=callback_on_step_end, callback_tensor_inputs=names,
        )
        latents = call.state["latents"]
        if output_type == "latent":
            images = latents
        else:
            decoded = decode_latents(self, self.vae, latents, where=type(self).__name__)
            images = postprocess(decoded, output_type)
        self.maybe_free_model_hooks()
        return self._output(images, return_dict)

    @staticmethod
    def _output(images, return_dict: bool):
        """diffusers' SD return value: no safety checker runs, so the NSFW slot is None."""
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    @staticmethod
    def _set_timesteps(scheduler, num_inference_steps, device, timesteps=None, sigmas=None) -> torch.Tensor:
        if timesteps is not None and sigmas is not None:
            raise InputError("pass custom timesteps or custom sigmas, not both")
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        elif sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps
