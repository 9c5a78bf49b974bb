"""SDXL image-to-image and inpainting: SDXL's text side combined with the SD task hooks.

Only the size conditioning differs from text-to-image: negative sizes default to the positive
ones, guidance groups the time ids [negatives..., positives...], and refiner-style checkpoints
(``requires_aesthetics_score``) condition on an aesthetic score instead of the target size.
"""
from __future__ import annotations

from .checks import check_finite_number
from .img2img import StableDiffusionImg2ImgPipeline
from .inpaint import StableDiffusionInpaintPipeline
from .sd_base import GenerationCall
from .sdxl import StableDiffusionXLPipeline


class _SDXLImageTaskMixin:
    """Time ids as diffusers' SDXL image-to-image and inpainting pipelines build them."""

    config_defaults = {"requires_aesthetics_score": False, "force_zeros_for_empty_prompt": True}
    time_ids_grouped = True

    def _time_id_pair(self, call: GenerationCall, extra: dict, pooled, dtype):
        size = (call.height, call.width)
        original = tuple(extra.get("original_size") or size)
        target = tuple(extra.get("target_size") or size)
        crop = tuple(extra.get("crops_coords_top_left") or (0, 0))
        negative_original = tuple(extra.get("negative_original_size") or original)
        negative_target = tuple(extra.get("negative_target_size") or target)
        if self.config.requires_aesthetics_score:
            negative_crop = tuple(extra.get("negative_crops_coords_top_left") or (0, 0))
            positive = list(original + crop + (extra["aesthetic_score"],))
            negative = list(negative_original + negative_crop + (extra["negative_aesthetic_score"],))
        else:  # diffusers pairs the negative sizes with the positive crop here; we keep its numbers
            positive = list(original + crop + target)
            negative = list(negative_original + crop + negative_target)
        return self._check_time_ids(positive, pooled, dtype), self._check_time_ids(negative, pooled, dtype)

    def _task_call(self, args: dict, **kw):
        extra = {k: kw.pop(k) for k in (
            "prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
            "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
            "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
            "negative_aesthetic_score", "clip_skip", "cross_attention_kwargs")}
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            check_finite_number(name, extra[name])
        return self._generate(args=args, extra=extra, **kw)


class StableDiffusionXLImg2ImgPipeline(_SDXLImageTaskMixin, StableDiffusionXLPipeline, StableDiffusionImg2ImgPipeline):
    """(prompt, image, strength) -> image with SDXL; as diffusers' StableDiffusionXLImg2ImgPipeline."""

    use_latent_stats = True

    def __call__(self, prompt=None, prompt_2=None, image=None, strength: float = 0.3, num_inference_steps: int = 50,
                 timesteps=None, sigmas=None, guidance_scale: float = 5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt: int = 1, eta: float = 0.0, generator=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 guidance_rescale: float = 0.0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, clip_skip: int | None = None,
                 cross_attention_kwargs=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        return self._task_call(
            {"image": image, "strength": strength},
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, height=None, width=None,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=None,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guidance_rescale=guidance_rescale,
            timesteps=timesteps, sigmas=sigmas, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs,
        )


class StableDiffusionXLInpaintPipeline(_SDXLImageTaskMixin, StableDiffusionXLPipeline, StableDiffusionInpaintPipeline):
    """(prompt, image, mask_image) -> image with SDXL; as diffusers' StableDiffusionXLInpaintPipeline."""

    callback_tensor_names = StableDiffusionXLPipeline.callback_tensor_names + ("mask", "masked_image_latents")

    def __call__(self, prompt=None, prompt_2=None, image=None, mask_image=None, height: int | None = None,
                 width: int | None = None, strength: float = 0.9999, num_inference_steps: int = 50,
                 timesteps=None, sigmas=None, guidance_scale: float = 7.5, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt: int = 1, eta: float = 0.0, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type: str = "pil", return_dict: bool = True,
                 guidance_rescale: float = 0.0, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, clip_skip: int | None = None,
                 cross_attention_kwargs=None, callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        return self._task_call(
            {"image": image, "mask_image": mask_image, "strength": strength},
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guidance_rescale=guidance_rescale,
            timesteps=timesteps, sigmas=sigmas, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs,
        )
