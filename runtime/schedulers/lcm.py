"""Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3).

Each step maps x_t to a clean estimate through the consistency boundary condition
(c_skip x_t + c_out x0), then re-noises it to the next timestep of a skipping schedule
taken from the distillation's ``original_inference_steps`` grid.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config
from runtime.models.errors import InputError

from .base import (
    PREDICTION_TYPES,
    SchedulerMixin,
    add_noise_vp,
    alphas_cumprod_for,
    check_choice,
    check_num_inference_steps,
    randn_tensor,
    velocity_vp,
)
from .outputs import LCMSchedulerOutput
from .ddim import clip_or_threshold


def lcm_boundary_scalings(timestep, timestep_scaling: float, sigma_data: float = 0.5):
    """(c_skip, c_out) of the consistency parameterization at a discrete timestep (LCM eq. 9)."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_x0(prediction_type: str, model_output, sample, alpha_prod_t):
    """x0 estimate from the model output at abar_t (epsilon, sample or v parameterization)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    if prediction_type == "sample":
        return model_output
    return alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output


def lcm_timesteps(num_steps: int, original_steps: int, num_train_timesteps: int, strength: float = 1.0) -> np.ndarray:
    """num_steps timesteps evenly picked (descending) from the distillation grid k*i - 1."""
    k = num_train_timesteps // original_steps
    origin = np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1
    picks = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[::-1].copy()[picks]


class LCMScheduler(SchedulerMixin):
    """LCM: few-step sampling for consistency-distilled models (fresh noise between steps)."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas=None, original_inference_steps: int = 50,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = 10.0,
                 rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas, rescale_betas_zero_snr, scheduler=name)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64), None)

    def _set_schedule(self, ts: np.ndarray, device) -> None:
        self._schedule = ts.tolist()
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, original_inference_steps=None,
                      timesteps=None, strength: float = 1.0) -> None:
        cfg, name = self.config, type(self).__name__
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError(f"{name}.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        original = original_inference_steps if original_inference_steps is not None else cfg.original_inference_steps
        if original > cfg.num_train_timesteps:
            raise InputError(f"{name}.set_timesteps: original_inference_steps={original} is more than "
                             f"num_train_timesteps={cfg.num_train_timesteps}")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise InputError(f"{name}.set_timesteps: custom timesteps must be descending, got {timesteps}")
            if timesteps[0] >= cfg.num_train_timesteps:
                raise InputError(f"{name}.set_timesteps: timesteps[0]={timesteps[0]} must be below "
                                 f"num_train_timesteps={cfg.num_train_timesteps}")
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            start = max(self.num_inference_steps - min(int(self.num_inference_steps * strength),
                                                       self.num_inference_steps), 0)
            self._set_schedule(np.array(timesteps, dtype=np.int64)[start * self.order:], device)
            return
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
        available = int(original * strength)
        if n > original or available // n < 1:
            raise InputError(f"{name}.set_timesteps: num_inference_steps={n} is more than the "
                             f"{available} timesteps of original_inference_steps={original} x strength={strength}")
        self.num_inference_steps = n
        self.custom_timesteps = False
        self._set_schedule(lcm_timesteps(n, original, cfg.num_train_timesteps, strength), device)

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        return lcm_boundary_scalings(timestep, self.config.timestep_scaling)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        self._require_timesteps()
        i = self._current_index(timestep)
        # As diffusers: alpha-bar and the boundary scalings at the timestep passed (a Python number
        # stays one), the previous timestep from the schedule.
        t_int = self.timestep_int(timestep)
        if isinstance(timestep, torch.Tensor):
            t = torch.tensor(t_int, dtype=timestep.dtype)  # on the CPU: no device sync per step
        else:
            t = timestep
        prev_t = self._schedule[i + 1] if i + 1 < len(self._schedule) else t_int
        alpha_prod_t = self.alphas_cumprod[t_int]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = lcm_boundary_scalings(t, self.config.timestep_scaling)
        x0 = lcm_x0(self.config.prediction_type, model_output, sample, alpha_prod_t)
        x0 = clip_or_threshold(x0, self.config)
        denoised = c_out * x0 + c_skip * sample
        if i != self.num_inference_steps - 1:  # re-noise to the next timestep (not after the last)
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = alpha_prod_t_prev.sqrt() * denoised + (1 - alpha_prod_t_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample, noise, timesteps):
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)
