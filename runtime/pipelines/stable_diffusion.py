"""Text-to-image with Stable Diffusion 1.x / 2.x (diffusers' StableDiffusionPipeline)."""
from __future__ import annotations

from .sd_base import StableDiffusionBase
from .single_file import FromSingleFileMixin


class StableDiffusionPipeline(FromSingleFileMixin, StableDiffusionBase):
    """prompt -> image; arguments and defaults as diffusers' StableDiffusionPipeline."""

    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
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
        guidance_rescale: float = 0.0,
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
            guidance_rescale=guidance_rescale, timesteps=timesteps, sigmas=sigmas,
            extra={"clip_skip": clip_skip, "cross_attention_kwargs": cross_attention_kwargs},
        )
