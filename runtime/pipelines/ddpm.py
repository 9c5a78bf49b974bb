"""Unconditional image generation with a pixel-space UNet2DModel (diffusers' DDPMPipeline)."""
from __future__ import annotations

import torch

from runtime.models.errors import InputError
from runtime.models.noise import randn_tensor
from runtime.image_io import OUTPUT_TYPES, postprocess

from .base import DiffusionPipeline
from .checks import check_finite, check_finite_number, check_generators, check_steps
from .denoise import denoise, step_kwargs
from .output import ImagePipelineOutput
from .sd_base import fresh_scheduler


class DDPMPipeline(DiffusionPipeline):
    """noise -> image with an unconditional UNet; works with any scheduler (DDPM, DDIM, ...)."""

    component_names = ("unet", "scheduler")
    model_cpu_offload_seq = "unet"

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True, eta: float = 0.0,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",)):
        check_steps(num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        check_generators(generator, batch_size)
        check_finite_number("eta", eta)
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        device = self._execution_device
        self._offload_phase("unet")
        scheduler = fresh_scheduler(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        # fp32 sample and scheduler math whatever the UNet's dtype (the loop casts at the call)
        noise = randn_tensor(shape, generator, device=device, dtype=torch.float32)
        state = {"latents": noise * scheduler.init_noise_sigma}
        image = denoise(self, scheduler, state, scheduler.timesteps, num_inference_steps, do_cfg=False,
                        extra_step_kwargs=step_kwargs(scheduler, generator, eta),
                        callback_on_step_end=callback_on_step_end,
                        callback_tensor_inputs=tuple(callback_on_step_end_tensor_inputs or ()))
        if output_type != "latent":
            check_finite(image, "DDPMPipeline")
            image = postprocess(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
