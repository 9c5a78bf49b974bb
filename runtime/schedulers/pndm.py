"""PNDM / PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models").

Runge-Kutta warm-up steps (PRK) for the first three intervals, then a 4th-order linear
multistep method (PLMS) on the noise estimates; ``skip_prk_steps`` starts PLMS at once.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config
from runtime.models.errors import InputError

from .base import (
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    add_noise_vp,
    alphas_cumprod_for,
    check_choice,
    check_num_inference_steps,
    spaced_timesteps,
)


def pndm_transfer(sample, eps, alpha_prod_t, alpha_prod_t_prev, prediction_type: str):
    """The transfer part phi(x_t, eps, t, t-delta) of PNDM (Liu et al. 2022, eq. 11)."""
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    if prediction_type == "v_prediction":
        eps = alpha_prod_t**0.5 * eps + beta_prod_t**0.5 * sample
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
    denom = alpha_prod_t * beta_prod_t_prev ** (0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom


def plms_eps(ets: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the last 1-4 noise estimates (newest last)."""
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


class PNDMScheduler(SchedulerMixin):
    """PNDM (PRK warm-up, then PLMS); the Stable Diffusion v1 default."""

    order = 1
    pndm_order = 4

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon",
                 timestep_spacing: str = "leading", steps_offset: int = 0):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas, scheduler=name)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        self._reset_run()

    def _reset_run(self) -> None:
        self.ets: list[torch.Tensor] = []
        self.counter = 0
        self.cur_model_output = 0
        self.cur_sample = None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg, name = self.config, type(self).__name__
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
        self.num_inference_steps = n
        ascending = spaced_timesteps(cfg.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset,
                                     scheduler=name)[::-1].astype(np.int64)
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            # the first PLMS step is taken twice (at t and again from its midpoint estimate)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            half = cfg.num_train_timesteps // n // 2
            prk = ascending[-self.pndm_order:].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ascending[:-3][::-1]
        self.plms_timesteps = plms.copy()
        ts = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._schedule = ts.tolist()
        self.timesteps = torch.from_numpy(ts).to(device)
        self._step_index = None
        self._begin_index = None
        self._reset_run()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None):
        """One PRK stage (the first 12 calls) or one PLMS step; ``generator`` is accepted and unused."""
        if self.counter < len(self.prk_timesteps if self.prk_timesteps is not None else ()) \
                and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def _output(self, prev_sample, return_dict: bool):
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One of the four Runge-Kutta stages per interval (Liu et al. 2022, eq. 13).

        As diffusers: the previous timestep is ``timestep`` minus a half interval on even stages.
        """
        self._require_timesteps()
        t = self.timestep_int(timestep)
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t - (0 if self.counter % 2 else half)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._output(self._transfer(cur_sample, model_output, t, prev_t), return_dict)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One linear multistep step on the noise estimates; the previous timestep is arithmetic."""
        self._require_timesteps()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise InputError("PNDMScheduler.step_plms: PLMS steps need the 12 PRK warm-up steps (step_prk) first; "
                             "run the full schedule or set skip_prk_steps=True")
        t = self.timestep_int(timestep)
        step = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - step
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_t, t = t, t + step
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            model_output = plms_eps(self.ets)
        return self._output(self._transfer(sample, model_output, t, prev_t), return_dict)

    def _transfer(self, sample, eps, t: int, prev_t: int):
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        return pndm_transfer(sample, eps, self.alphas_cumprod[t], abar_prev, self.config.prediction_type)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
