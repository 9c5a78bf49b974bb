"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 6-7)."""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config
from runtime.models.errors import InputError

from .base import (
    DDPM_BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    add_noise_vp,
    alphas_cumprod_for,
    check_choice,
    check_num_inference_steps,
    randn_tensor,
    spaced_timesteps,
    velocity_vp,
)
from .ddim import clip_or_threshold, predict_x0_eps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def ddpm_posterior_mean(x0, sample, alpha_prod_t, alpha_prod_t_prev):
    """Mean of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7)."""
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0_coeff = alpha_prod_t_prev ** (0.5) * current_beta_t / beta_prod_t
    sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    return x0_coeff * x0 + sample_coeff * sample


def ddpm_variance(alpha_prod_t, alpha_prod_t_prev, variance_type: str, predicted_variance=None):
    """The posterior variance for ``variance_type`` (log-variance for the *_log / learned_range kinds)."""
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    if variance_type == "fixed_small":
        return variance
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "fixed_large":
        return current_beta_t
    if variance_type == "fixed_large_log":
        return torch.log(current_beta_t)
    if variance_type == "learned":
        return predicted_variance
    frac = (predicted_variance + 1) / 2  # learned_range (Nichol & Dhariwal 2021, eq. 15)
    return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)


class DDPMScheduler(SchedulerMixin):
    """DDPM: the original stochastic sampler; also the training-time noise schedule."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice(name, "variance_type", variance_type, VARIANCE_TYPES)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas, rescale_betas_zero_snr, scheduler=name,
                                                 beta_schedules=DDPM_BETA_SCHEDULES)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64), None)

    def _set_schedule(self, ts: np.ndarray, device) -> None:
        self._schedule = ts.tolist()
        self.timesteps = torch.from_numpy(ts).to(device)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None) -> None:
        cfg, name = self.config, type(self).__name__
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError(f"{name}.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise InputError(f"{name}.set_timesteps: custom timesteps must be descending, got {timesteps}")
            if timesteps[0] >= cfg.num_train_timesteps:
                raise InputError(f"{name}.set_timesteps: timesteps[0]={timesteps[0]} must be below "
                                 f"num_train_timesteps={cfg.num_train_timesteps}")
            self.custom_timesteps = True
            self._set_schedule(np.array(timesteps, dtype=np.int64), device)
            return
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
        self.num_inference_steps = n
        self.custom_timesteps = False
        ts = spaced_timesteps(cfg.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset, scheduler=name)
        self._set_schedule(ts.astype(np.int64), device)

    def previous_timestep(self, timestep) -> int:
        """The schedule's next entry after ``timestep`` (-1 after the last); ``timestep - 1`` before
        set_timesteps, as diffusers."""
        t = self.timestep_int(timestep)
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        index = self._position_in_schedule(timestep, t)
        return self._schedule[index + 1] if index + 1 < len(self._schedule) else -1

    def _position_in_schedule(self, timestep, t: int) -> int:
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            position = self._timestep_position(timestep.reshape(()))
            if position is not None:
                return position
        try:
            return self._schedule.index(t)
        except ValueError:
            raise InputError(f"DDPMScheduler.step: timestep {t} is not in the schedule set by set_timesteps "
                             f"({len(self._schedule)} timesteps from {self._schedule[0]} to {self._schedule[-1]})") from None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        t = self.timestep_int(timestep)
        prev_t = self.previous_timestep(timestep)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        x0, _ = predict_x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t)
        x0 = clip_or_threshold(x0, self.config)
        prev_sample = ddpm_posterior_mean(x0, sample, alpha_prod_t, alpha_prod_t_prev)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            variance = ddpm_variance(alpha_prod_t, alpha_prod_t_prev, self.variance_type, predicted_variance)
            if self.variance_type == "fixed_small_log":
                prev_sample = prev_sample + variance * noise
            elif self.variance_type == "learned_range":
                prev_sample = prev_sample + torch.exp(0.5 * variance) * noise
            else:
                prev_sample = prev_sample + variance ** (0.5) * noise
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample, noise, timesteps):
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)
