"""Image-to-image (SDEdit): noise an encoded image to ``strength`` and denoise from there."""
from __future__ import annotations

import torch

from runtime.models.errors import InputError
from runtime.models.noise import randn_tensor
from runtime.image_io import image_size, preprocess_image

from .checks import check_strength
from .sd_base import GenerationCall, StableDiffusionBase
from .single_file import FromSingleFileMixin
from .vae_codec import encode_image


def strength_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The tail of the schedule that ``strength`` keeps, and its step count (begin index set)."""
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - kept, 0)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    steps = num_inference_steps - start
    if steps < 1:
        raise InputError(
            f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising step; "
            "raise strength or the number of steps"
        )
    return timesteps, steps


def repeat_to_batch(latents: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if latents.shape[0] == batch:
        return latents
    if batch % latents.shape[0]:
        raise InputError(f"{what}: cannot spread {latents.shape[0]} images over a batch of {batch}")
    return latents.repeat(batch // latents.shape[0], 1, 1, 1)


class StableDiffusionImg2ImgPipeline(FromSingleFileMixin, StableDiffusionBase):
    """(prompt, image, strength) -> image; as diffusers' StableDiffusionImg2ImgPipeline."""

    use_latent_stats = False  # SDXL's image-to-image normalizes encoded latents by the VAE's latents_mean/std

    def _check_task(self, args) -> None:
        if args.get("image") is None:
            raise InputError("image is required for image-to-image")
        check_strength(args["strength"])

    def _task_size(self, height, width, args):
        """The image decides: its size rounded down to the VAE factor (latents: times the factor)."""
        image, factor = args["image"], self.vae_scale_factor
        first = image[0] if isinstance(image, (list, tuple)) else image
        if isinstance(first, torch.Tensor) and first.shape[-3] == self.vae.config.latent_channels:
            return first.shape[-2] * factor, first.shape[-1] * factor
        h, w = image_size(image)
        return h - h % factor, w - w % factor

    def _prepare_latents(self, call: GenerationCall, latents, timesteps):
        image = preprocess_image(call.args["image"], factor=self.vae_scale_factor,
                                 latent_channels=self.vae.config.latent_channels)
        timesteps, steps = strength_timesteps(call.scheduler, call.num_inference_steps, call.args["strength"])
        start = timesteps[:1].repeat(call.total)
        if image.shape[1] == self.vae.config.latent_channels:
            init = image.to(device=call.device, dtype=call.dtype)
        else:
            image = image.to(device=call.device, dtype=call.dtype)
            if isinstance(call.generator, list):
                image = repeat_to_batch(image, call.total, "image")
            init = encode_image(self, self.vae, image, call.generator, self.use_latent_stats).to(call.dtype)
        init = repeat_to_batch(init, call.total, "image")
        noise = randn_tensor(init.shape, call.generator, device=call.device, dtype=call.dtype)
        call.state["latents"] = call.scheduler.add_noise(init, noise, start)
        return timesteps, steps

    def __call__(
        self,
        prompt=None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps=None,
        sigmas=None,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator=None,
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
            negative_prompt_embeds=negative_prompt_embeds, height=None, width=None,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=None,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            timesteps=timesteps, sigmas=sigmas,
            args={"image": image, "strength": strength},
            extra={"clip_skip": clip_skip, "cross_attention_kwargs": cross_attention_kwargs},
        )

