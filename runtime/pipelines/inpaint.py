"""Inpainting: repaint where the mask is white, with a 9-channel inpainting UNet or a plain one.

9-channel UNets see [latents, mask, masked-image latents] at every step. 4-channel UNets see the
latents only; after each step the kept region is reset to the original image noised to the next
timestep (masked latent blending), as diffusers' StableDiffusionInpaintPipeline does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.models.errors import ConfigError, InputError
from runtime.models.noise import randn_tensor
from runtime.image_io import image_size, preprocess_image, preprocess_mask

from .checks import check_strength
from .img2img import repeat_to_batch, strength_timesteps
from .sd_base import GenerationCall, StableDiffusionBase
from .single_file import FromSingleFileMixin
from .vae_codec import encode_image


def _is_latents(image, channels: int) -> bool:
    return isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == channels


class StableDiffusionInpaintPipeline(FromSingleFileMixin, StableDiffusionBase):
    """(prompt, image, mask_image) -> image; as diffusers' StableDiffusionInpaintPipeline."""

    callback_tensor_names = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    def _check_task(self, args) -> None:
        image, mask = args.get("image"), args.get("mask_image")
        if image is None or mask is None:
            raise InputError("inpainting needs both image and mask_image")
        check_strength(args["strength"])
        if not _is_latents(image, self.vae.config.latent_channels) and image_size(image) != image_size(mask):
            raise InputError(
                f"mask_image size {image_size(mask)} (height, width) differs from image size {image_size(image)}"
            )
        channels = self.unet.config.in_channels
        if channels not in (4, 9):
            raise ConfigError(f"inpainting needs a UNet with 4 or 9 input channels, this one has in_channels={channels}")

    def _prepare_latents(self, call: GenerationCall, latents, timesteps):
        args, factor, scheduler = call.args, self.vae_scale_factor, call.scheduler
        strength = args["strength"]
        timesteps, steps = strength_timesteps(scheduler, call.num_inference_steps, strength)
        start = timesteps[:1].repeat(call.total)
        full_strength = strength == 1.0
        latent_channels = self.vae.config.latent_channels
        blend = self.unet.config.in_channels == 4
        init_image = preprocess_image(args["image"], call.height, call.width, factor=factor,
                                      latent_channels=latent_channels).to(torch.float32)
        shape = (call.total, latent_channels, call.height // factor, call.width // factor)

        image_latents = None
        if blend or (latents is None and not full_strength):
            image = init_image.to(device=call.device, dtype=call.dtype)
            image_latents = image if image.shape[1] == latent_channels else encode_image(self, self.vae, image, call.generator)
            image_latents = image_latents.to(call.dtype).repeat(call.total // image_latents.shape[0], 1, 1, 1)
        if latents is None:
            noise = randn_tensor(shape, call.generator, device=call.device, dtype=call.dtype)
            if full_strength:
                latents = noise * scheduler.init_noise_sigma
            else:
                latents = scheduler.add_noise(image_latents, noise, start)
        else:
            noise = latents.to(call.device)
            latents = noise * scheduler.init_noise_sigma
        call.state["latents"] = latents

        mask_condition = preprocess_mask(args["mask_image"], call.height, call.width, factor=factor)
        masked_image = init_image * (mask_condition < 0.5)
        mask = F.interpolate(mask_condition, size=(call.height // factor, call.width // factor))
        mask = mask.to(device=call.device, dtype=call.dtype)
        if masked_image.shape[1] == latent_channels:
            masked_latents = masked_image.to(device=call.device, dtype=call.dtype)
        else:
            masked_latents = encode_image(self, self.vae, masked_image.to(device=call.device, dtype=call.dtype),
                                          call.generator)
        mask = repeat_to_batch(mask, call.total, "mask_image")
        masked_latents = repeat_to_batch(masked_latents.to(call.dtype), call.total, "image")
        if call.do_cfg:  # (2B, ...) to sit beside the duplicated latents
            mask, masked_latents = torch.cat([mask] * 2), torch.cat([masked_latents] * 2)
        call.state["mask"], call.state["masked_image_latents"] = mask, masked_latents

        if blend:
            call.after_step = self._blend_hook(call, image_latents, noise, timesteps)
        else:
            expected = latent_channels + mask.shape[1] + masked_latents.shape[1]
            if expected != self.unet.config.in_channels:
                raise ConfigError(
                    f"inpainting UNet expects in_channels={self.unet.config.in_channels} but latents, mask and "
                    f"masked image give {expected}"
                )
            call.model_input = lambda state, x: torch.cat([x, state["mask"], state["masked_image_latents"]], dim=1)
        return timesteps, steps

    @staticmethod
    def _blend_hook(call: GenerationCall, image_latents, noise, timesteps):
        """After each step keep the unmasked region at the original image, noised to the next step."""
        last = len(timesteps) - 1

        def after_step(i: int, state: dict) -> None:
            mask = state["mask"].chunk(2)[0] if call.do_cfg else state["mask"]
            kept = image_latents
            if i < last:
                kept = call.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            state["latents"] = (1 - mask) * kept + mask * state["latents"]

        return after_step

    def __call__(
        self,
        prompt=None,
        image=None,
        mask_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None, cross_attention_kwargs=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        return self._generate(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            timesteps=timesteps, sigmas=sigmas,
            args={"image": image, "mask_image": mask_image, "strength": strength},
            extra={"clip_skip": clip_skip, "cross_attention_kwargs": cross_attention_kwargs},
        )
