"""Depth-to-image (SD 2 depth): image-to-image whose UNet also sees the image's depth map.

As diffusers' StableDiffusionDepth2ImgPipeline: the depth map (``depth_map=`` or the
``depth_estimator`` on the ``feature_extractor``'s pixel values) is resized bicubically to the
latent size, normalised per image to [-1, 1], repeated to the batch (and doubled for guidance),
and concatenated after ``scale_model_input``, giving the 5-channel UNet input. Without an
estimator (single-file checkpoints hold none) ``depth_map`` is required. The call returns
``ImagePipelineOutput`` / ``(images,)``, as diffusers' does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.models.errors import InputError

from .img2img import StableDiffusionImg2ImgPipeline, repeat_to_batch
from .output import ImagePipelineOutput
from .sd_base import GenerationCall


def _image_list(image) -> list:
    if isinstance(image, (list, tuple)):
        return list(image)
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return list(image)
    return [image]


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """(prompt, image, depth_map=None, strength) -> image; as diffusers' StableDiffusionDepth2ImgPipeline."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "depth_estimator", "feature_extractor")
    optional_components = ("depth_estimator", "feature_extractor")
    config_defaults: dict = {}
    callback_tensor_names = ("latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask")
    fix_legacy_scheduler = False  # diffusers' depth-to-image keeps the scheduler config as it is

    def _check_task(self, args) -> None:
        super()._check_task(args)
        depth_map = args.get("depth_map")
        if depth_map is None and (self.depth_estimator is None or self.feature_extractor is None):
            missing = [n for n in ("depth_estimator", "feature_extractor") if getattr(self, n) is None]
            raise InputError(
                f"{type(self).__name__}: no depth_map was passed and the pipeline has no {' / '.join(missing)}; "
                "pass depth_map=(B, H, W) tensor, or load the pipeline with depth_estimator= and "
                "feature_extractor= (a DPTForDepthEstimation and its DPTImageProcessor)"
            )
        if depth_map is not None and (not torch.is_tensor(depth_map) or depth_map.ndim not in (2, 3, 4)
                                      or depth_map.ndim == 4 and depth_map.shape[1] != 1):
            raise InputError(f"depth_map must be a (B, H, W) tensor (or (H, W), (B, 1, H, W)), got "
                             f"{tuple(depth_map.shape) if torch.is_tensor(depth_map) else type(depth_map).__name__}")

    def estimate_depth(self, image) -> torch.Tensor:
        """The depth estimator's (B, H, W) prediction for ``image`` (PIL / arrays / tensors, or lists)."""
        estimator = self.depth_estimator
        pixel_values = self.feature_extractor(images=_image_list(image), return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=estimator.device, dtype=estimator.dtype)
        return estimator(pixel_values).predicted_depth

    def _depth_mask(self, call: GenerationCall) -> torch.Tensor:
        depth = call.args.get("depth_map")
        if depth is None:
            depth = self.estimate_depth(call.args["image"])
        depth = depth.to(device=call.device, dtype=torch.float32)
        depth = depth[None] if depth.ndim == 2 else depth
        depth = depth[:, None] if depth.ndim == 3 else depth  # (B, 1, H, W)
        size = call.state["latents"].shape[-2:]
        depth = F.interpolate(depth, size=size, mode="bicubic", align_corners=False)
        low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
        depth = 2.0 * (depth - low) / (high - low) - 1.0
        if depth.shape[0] < call.total:
            depth = repeat_to_batch(depth, call.total, "depth_map")
        return torch.cat([depth] * 2) if call.do_cfg else depth

    def _prepare_latents(self, call: GenerationCall, latents, timesteps):
        timesteps, steps = super()._prepare_latents(call, latents, timesteps)
        call.state["depth_mask"] = self._depth_mask(call)
        call.model_input = lambda state, x: torch.cat([x, state["depth_mask"].to(x.dtype)], dim=1)
        return timesteps, steps

    @staticmethod
    def _output(images, return_dict: bool):
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def __call__(
        self,
        prompt=None,
        image=None,
        depth_map: torch.Tensor | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        timesteps=None,
        sigmas=None,
    ):
        return self._generate(
            prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, height=None, width=None,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=None,
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            timesteps=timesteps, sigmas=sigmas,
            args={"image": image, "strength": strength, "depth_map": depth_map},
            extra={"clip_skip": clip_skip, "cross_attention_kwargs": cross_attention_kwargs},
        )
