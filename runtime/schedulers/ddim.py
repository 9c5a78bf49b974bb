"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12)."""
from __future__ import annotations

import torch

from .base import register_to_config
from runtime.models.errors import InputError

from .base import (
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
    threshold_sample,
    velocity_vp,
)


def predict_x0_eps(prediction_type: str, model_output, sample, alpha_prod_t):
    """(x0, eps) estimates from a model output under a VP parameterization at abar_t."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t ** (0.5) * model_output) / beta_prod_t ** (0.5)
    # v_prediction (Salimans & Ho 2022)
    x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
    return x0, (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample


def clip_or_threshold(x0: torch.Tensor, config) -> torch.Tensor:
    """The config's x0 post-processing: dynamic thresholding, else clipping, else nothing."""
    if config.get("thresholding"):
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.get("clip_sample"):
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def ddim_variance(alpha_prod_t, alpha_prod_t_prev):
    """sigma_t^2 of DDIM (eq. 16) before the eta factor."""
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    return beta_prod_t_prev / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddim_step(x0, eps, alpha_prod_t_prev, std_dev_t):
    """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps (noise added by caller)."""
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
    return alpha_prod_t_prev ** (0.5) * x0 + direction


class DDIMScheduler(SchedulerMixin):
    """DDIM: deterministic at eta=0, DDPM-like at eta=1."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas, rescale_betas_zero_snr, scheduler=name)
        # abar "before" the first step: 1 (a clean sample) or abar_0.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._schedule: list[int] = []

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, type(self).__name__)
        self.num_inference_steps = n
        ts = spaced_timesteps(cfg.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset,
                              scheduler=type(self).__name__).astype("int64")
        self._schedule = ts.tolist()
        self.timesteps = torch.from_numpy(ts).to(device)
        self._step_index = None
        self._begin_index = None

    def previous_timestep(self, timestep) -> int:
        return self.timestep_int(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    def _abar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        self._require_timesteps()
        # As diffusers: the previous timestep is arithmetic, so any timestep (and order) works.
        t = self.timestep_int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[t], self._abar(prev_t)
        x0, eps = predict_x0_eps(self.config.prediction_type, model_output, sample, alpha_prod_t)
        x0 = clip_or_threshold(x0, self.config)
        std_dev_t = eta * ddim_variance(alpha_prod_t, alpha_prod_t_prev) ** (0.5)
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t ** (0.5) * x0) / (1 - alpha_prod_t) ** (0.5)
        prev_sample = ddim_step(x0, eps, alpha_prod_t_prev, std_dev_t)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise InputError("DDIMScheduler.step: pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample, noise, timesteps):
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)

