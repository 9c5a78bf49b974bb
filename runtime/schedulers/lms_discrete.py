"""Linear multistep sampling (k-diffusion sample_lms): Adams-type steps on the sigma ODE.

The coefficients integrate the Lagrange basis polynomials through the last ``order`` sigmas
over the next interval; they are polynomials, so the integral is exact (no quadrature).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config

from .base import SchedulerOutput, alphas_cumprod_for, check_num_inference_steps
from .sigma_scheduler import SigmaSchedulerMixin, x0_from_sigma_output
from .sigma_schedules import check_one_respacing


def lms_coefficient(sigmas: list[float], order: int, t: int, current_order: int) -> float:
    """Integral over [sigmas[t], sigmas[t+1]] of the Lagrange basis for node t - current_order."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k == current_order:
            continue
        denom = sigmas[t - current_order] - sigmas[t - k]
        poly = poly * np.poly1d([1.0 / denom, -sigmas[t - k] / denom])
    antiderivative = np.polyint(poly)
    return float(antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t]))


class LMSDiscreteScheduler(SigmaSchedulerMixin):
    """LMS: up to 4th-order linear multistep over the stored derivatives (x - x0) / sigma."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        name = type(self).__name__
        self._check_common(prediction_type, timestep_spacing)
        check_one_respacing(name, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                            use_beta_sigmas=use_beta_sigmas)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas, scheduler=name)
        self.sigmas = self._full_train_sigmas()
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self._sigma_values = self.sigmas.tolist()
        self.num_inference_steps = None
        self.derivatives: list[torch.Tensor] = []
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, type(self).__name__)
        self.num_inference_steps = n
        ts, sigmas = self._discrete_schedule(n)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._sigma_values = self.sigmas.tolist()  # Python floats for the coefficient integrals
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.float32)
        self.derivatives = []
        self._step_index = None
        self._begin_index = None

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        return lms_coefficient(self._sigma_values, order, t, current_order)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True, generator=None):
        """One LMS step of up to ``order``; deterministic (``generator`` is unused)."""
        i = self._current_index(timestep)
        sigma = self.sigmas[i]
        x0 = x0_from_sigma_output(self.config.prediction_type, model_output, sample, sigma)
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(i + 1, order)
        coeffs = [lms_coefficient(self._sigma_values, order, i, k) for k in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
