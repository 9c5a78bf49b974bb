"""Euler and Euler-ancestral samplers (Karras et al. 2022, Algorithm 2; k-diffusion sample_euler*)."""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config
from runtime.models.errors import InputError

from .base import SchedulerOutput, alphas_cumprod_for, check_choice, check_num_inference_steps, randn_tensor
from .sigma_scheduler import SigmaSchedulerMixin, x0_from_sigma_output
from .sigma_schedules import check_one_respacing, respace_sigmas, sigma_to_t, train_sigmas


def euler_step(sample, x0, sigma_hat, sigma_next):
    """One Euler step of dx/dsigma = (x - x0) / sigma from sigma_hat to sigma_next."""
    derivative = (sample - x0) / sigma_hat
    return sample + derivative * (sigma_next - sigma_hat)


def ancestral_sigmas(sigma_from, sigma_to):
    """(sigma_down, sigma_up): the deterministic target and the fresh-noise scale of an ancestral step."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class EulerDiscreteScheduler(SigmaSchedulerMixin):
    """Euler (with optional churn, Karras et al. 2022 Algorithm 2) over a discrete sigma table."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, sigma_min: float | None = None,
                 sigma_max: float | None = None, timestep_spacing: str = "linspace", timestep_type: str = "discrete",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, final_sigmas_type: str = "zero"):
        name = type(self).__name__
        self._check_common(prediction_type, timestep_spacing)
        check_choice(name, "interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice(name, "timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_one_respacing(name, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                            use_beta_sigmas=use_beta_sigmas)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                                 rescale_betas_zero_snr, zero_snr_floor=True, scheduler=name)
        self.sigmas = self._full_train_sigmas()
        self._sigma_values = self.sigmas.tolist()
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self.timesteps = 0.25 * self.sigmas[:-1].log()
        else:
            self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.num_inference_steps = None
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None) -> None:
        cfg, name = self.config, type(self).__name__
        given = [k for k, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]
        if len(given) != 1:
            raise InputError(f"{name}.set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas")
        respacing = cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas
        if timesteps is not None and (respacing or (cfg.timestep_type == "continuous"
                                                    and cfg.prediction_type == "v_prediction")):
            raise InputError(f"{name}.set_timesteps: custom timesteps cannot be used with this config's sigma respacing")
        if num_inference_steps is not None:
            n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
        else:
            n = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = n
        if sigmas is not None:
            log_sigmas = np.log(train_sigmas(self.alphas_cumprod))
            sigmas = np.array(sigmas).astype(np.float32)
            ts = sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if cfg.interpolation_type == "log_linear":
                ts, _ = self._discrete_schedule(n, timesteps, respace=False)
                table = train_sigmas(self.alphas_cumprod)
                sigmas = torch.linspace(np.log(table[-1]), np.log(table[0]), n + 1).exp().numpy()
                ts, sigmas = self._respaced(ts, sigmas, n)
            else:
                ts, sigmas = self._discrete_schedule(n, timesteps)
            if cfg.final_sigmas_type == "sigma_min":
                ac0 = self.alphas_cumprod[0]
                sigma_last = (((1 - ac0) / ac0) ** 0.5).item()
            else:
                sigma_last = 0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            self.timesteps = (0.25 * sigmas[:-1].log()).to(device=device)
        else:
            self.timesteps = torch.from_numpy(np.asarray(ts).astype(np.float32)).to(device=device)
        self.sigmas = sigmas  # on the CPU: per-step scalars never wait on the device
        self._sigma_values = sigmas.tolist()
        self._step_index = None
        self._begin_index = None

    def _respaced(self, ts, sigmas, n):
        respaced = respace_sigmas(self.config, sigmas, n)
        if respaced is None:
            return ts, sigmas
        return sigma_to_t(respaced, np.log(train_sigmas(self.alphas_cumprod))), respaced

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
        i = self._current_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        gamma = 0.0
        if s_churn > 0 and s_tmin <= self._sigma_values[i] <= s_tmax:
            gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # "churn": raise the noise level to sigma_hat with fresh noise
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        x0 = x0_from_sigma_output(self.config.prediction_type, model_output, sample, sigma, sigma_eps=sigma_hat)
        prev_sample = euler_step(sample, x0, sigma_hat, self.sigmas[i + 1]).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of scale sigma_up."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        self._check_common(prediction_type, timestep_spacing)
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                                 rescale_betas_zero_snr, zero_snr_floor=True,
                                                 scheduler=type(self).__name__)
        self.sigmas = self._full_train_sigmas()
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float64)
        self.num_inference_steps = None
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        cfg = self.config
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, type(self).__name__)
        self.num_inference_steps = n
        ts, sigmas = self._discrete_schedule(n, respace=False)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts).to(device=device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self._current_index(timestep)
        sigma = self.sigmas[i]
        sample = sample.to(torch.float32)
        x0 = x0_from_sigma_output(self.config.prediction_type, model_output, sample, sigma)
        sigma_down, sigma_up = ancestral_sigmas(self.sigmas[i], self.sigmas[i + 1])
        prev_sample = euler_step(sample, x0, sigma, sigma_down)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

