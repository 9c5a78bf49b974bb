"""Heun's 2nd-order sampler (Karras et al. 2022, Algorithm 1 with churn 0).

Each interval takes two model calls: an Euler predictor to sigma_next, then the trapezoidal
corrector; the schedule lists every inner timestep twice, and ``order`` is 2.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config
from runtime.models.errors import InputError

from .base import HEUN_BETA_SCHEDULES, SchedulerOutput, alphas_cumprod_for, check_num_inference_steps
from .sigma_scheduler import SigmaSchedulerMixin, x0_from_sigma_output
from .sigma_schedules import check_one_respacing


def heun_correct(prev_derivative, sample, x0, sigma_next):
    """The trapezoidal slope: the mean of the predictor's slope and the slope at sigma_next."""
    return (prev_derivative + (sample - x0) / sigma_next) / 2


def doubled(values: torch.Tensor, keep_last: bool) -> torch.Tensor:
    """[a, b, c, d] -> [a, b, b, c, c, d] (keep_last) or [a, b, b, c, c, d, d] (not keep_last)."""
    if keep_last:
        return torch.cat([values[:1], values[1:-1].repeat_interleave(2), values[-1:]])
    return torch.cat([values[:1], values[1:].repeat_interleave(2)])


class HeunDiscreteScheduler(SigmaSchedulerMixin):
    """Heun: a predictor-corrector pair per interval, two model evaluations each."""

    order = 2

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 clip_sample: bool = False, clip_sample_range: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0):
        name = type(self).__name__
        self._check_common(prediction_type, timestep_spacing)
        check_one_respacing(name, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                            use_beta_sigmas=use_beta_sigmas)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas, scheduler=name,
                                                 beta_schedules=HEUN_BETA_SCHEDULES)
        # Until set_timesteps: every training timestep (the schedule diffusers builds here too).
        self.sigmas = doubled(self._full_train_sigmas(), keep_last=True)
        self.timesteps = doubled(torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32), keep_last=False)
        self.num_inference_steps = None
        self._reset_run()

    def _reset_run(self) -> None:
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, num_train_timesteps=None,
                      timesteps=None) -> None:
        cfg, name = self.config, type(self).__name__
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError(f"{name}.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas):
            raise InputError(f"{name}.set_timesteps: custom timesteps cannot be used with this config's sigma respacing")
        if num_train_timesteps not in (None, cfg.num_train_timesteps):
            raise InputError(f"{name}.set_timesteps: num_train_timesteps={num_train_timesteps} differs from the config's "
                             f"{cfg.num_train_timesteps}")
        if num_inference_steps is not None:
            n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
        else:
            n = len(timesteps)
        self.num_inference_steps = n
        ts, sigmas = self._discrete_schedule(n, timesteps)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = doubled(sigmas, keep_last=True)
        self.timesteps = doubled(torch.from_numpy(np.asarray(ts)), keep_last=False).to(device=device, dtype=torch.float32)
        self._reset_run()
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None):
        """The predictor or corrector half of a Heun step; ``generator`` is unused."""
        i = self._current_index(timestep)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sigma_input = sigma if first else sigma_next
        x0 = x0_from_sigma_output(self.config.prediction_type, model_output, sample, sigma_input)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:  # predictor: Euler to sigma_next; keep the slope for the corrector
            derivative = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:  # corrector: restart from the interval's first sample with the averaged slope
            derivative = heun_correct(self.prev_derivative, sample, x0, sigma_next)
            dt, sample = self.dt, self.sample
            self._reset_run()
        prev_sample = sample + derivative * dt
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


