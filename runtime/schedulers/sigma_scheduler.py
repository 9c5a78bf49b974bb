"""The shared part of the k-diffusion-style schedulers (Euler, Euler ancestral, Heun, LMS).

They integrate in the variance-exploding form x = x0 + sigma * eps: the model sees
x / sqrt(sigma^2 + 1) (``scale_model_input``) and the run starts at ``init_noise_sigma``.
Sigmas stay on the CPU (as in diffusers), so per-step scalars never wait on an accelerator.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import PREDICTION_TYPES, TIMESTEP_SPACINGS, SchedulerMixin, check_choice, spaced_timesteps
from .sigma_schedules import interp_sigmas, respace_sigmas, sigma_to_t, train_sigmas


def x0_from_sigma_output(prediction_type: str, model_output, sample, sigma, sigma_eps=None):
    """x0 estimate in the VE form; ``sigma_eps`` is the sigma the epsilon form uses (Euler's sigma_hat)."""
    if prediction_type == "epsilon":
        return sample - (sigma if sigma_eps is None else sigma_eps) * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output  # "sample"


class SigmaSchedulerMixin(SchedulerMixin):
    """init_noise_sigma, scale_model_input and add_noise over a CPU ``self.sigmas`` table."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def _check_common(self, prediction_type: str, timestep_spacing: str) -> None:
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the VP-scaled input the network was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._sigma_indices(timesteps)].flatten()
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))  # (B, 1, 1, 1)
        return original_samples + noise * sigma

    def _discrete_schedule(self, num_steps: int, timesteps=None, *, respace: bool = True):
        """(timesteps, sigmas) as float numpy arrays for a spaced (or given) discrete schedule."""
        cfg = self.config
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.float32)
        else:
            ts = spaced_timesteps(cfg.timestep_spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset,
                                  round_linspace=False, scheduler=type(self).__name__).astype(np.float32)
        table = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(table)
        sigmas = interp_sigmas(ts, table)
        if respace:
            respaced = respace_sigmas(cfg, sigmas, num_steps)
            if respaced is not None:
                return sigma_to_t(respaced, log_sigmas), respaced
        return ts, sigmas

    def _full_train_sigmas(self) -> torch.Tensor:
        """sigmas over all training timesteps, descending, with the final 0 (the state before set_timesteps)."""
        table = train_sigmas(self.alphas_cumprod)
        return torch.from_numpy(np.concatenate([table[::-1], [0.0]]).astype(np.float32))
