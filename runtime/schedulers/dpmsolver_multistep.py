"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithms 1-2) and its SDE variant.

Data-prediction (x0) form in log-SNR time lambda = log(alpha_t / sigma_t): first order is DDIM,
"2M" reuses the previous x0 estimate for a second-order step, "3M" the two previous ones.
``sde-dpmsolver++`` adds the matching noise (Lu et al. 2022, appendix; "DPM++ 2M SDE").
"""
from __future__ import annotations

import numpy as np
import torch

from .base import register_to_config
from runtime.models.errors import ConfigError, InputError

from .base import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerMixin,
    SchedulerOutput,
    alphas_cumprod_for,
    check_choice,
    check_num_inference_steps,
    randn_tensor,
    spaced_timesteps,
    threshold_sample,
)
from .sigma_schedules import (
    check_one_respacing,
    flow_sigmas,
    interp_sigmas,
    respace_sigmas,
    sigma_to_alpha_sigma_t,
    sigma_to_t,
    train_sigmas,
)

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")


def dpm_noise_first_order_update(sample, eps, sigma_s, sigma_t, sde: bool, noise=None, flow: bool = False):
    """DPM-Solver-1 in the noise-prediction form (Lu et al. 2022a, eq. 3.7); ``sde``: its SDE variant."""
    alpha_t, s_t, lambda_t = alpha_sigma_lambda(sigma_t, flow)
    alpha_s, _, lambda_s = alpha_sigma_lambda(sigma_s, flow)
    h = lambda_t - lambda_s
    if not sde:
        return (alpha_t / alpha_s) * sample - (s_t * (torch.exp(h) - 1.0)) * eps
    return ((alpha_t / alpha_s) * sample - 2.0 * (s_t * (torch.exp(h) - 1.0)) * eps
            + s_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)


def dpm_noise_2m_update(sample, m0, m1, sigma_t, sigma_s0, sigma_s1, sde: bool, solver_type: str, noise=None,
                        flow: bool = False):
    """Multistep DPM-Solver-2 on noise estimates m0 (at s0) and m1 (at s1)."""
    alpha_t, s_t, lambda_t = alpha_sigma_lambda(sigma_t, flow)
    alpha_s0, _, lambda_s0 = alpha_sigma_lambda(sigma_s0, flow)
    _, _, lambda_s1 = alpha_sigma_lambda(sigma_s1, flow)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    d0, d1 = m0, (1.0 / (h_0 / h)) * (m0 - m1)
    k = 2.0 if sde else 1.0  # the SDE variant doubles the noise-estimate terms
    x_t = (alpha_t / alpha_s0) * sample - k * (s_t * (torch.exp(h) - 1.0)) * d0
    if solver_type == "midpoint":
        x_t = x_t - 0.5 * k * (s_t * (torch.exp(h) - 1.0)) * d1
    else:
        x_t = x_t - k * (s_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
    return x_t + s_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise if sde else x_t


def dpm_noise_3m_update(sample, m0, m1, m2, sigma_t, sigma_s0, sigma_s1, sigma_s2, flow: bool = False):
    """Multistep DPM-Solver-3 on the last three noise estimates (ODE only, as in diffusers)."""
    alpha_t, s_t, lambda_t = alpha_sigma_lambda(sigma_t, flow)
    alpha_s0, _, lambda_s0 = alpha_sigma_lambda(sigma_s0, flow)
    _, _, lambda_s1 = alpha_sigma_lambda(sigma_s1, flow)
    _, _, lambda_s2 = alpha_sigma_lambda(sigma_s2, flow)
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return ((alpha_t / alpha_s0) * sample - (s_t * (torch.exp(h) - 1.0)) * m0
            - (s_t * ((torch.exp(h) - 1.0) / h - 1.0)) * d1
            - (s_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * d2)


def alpha_sigma_lambda(sigma: torch.Tensor, flow: bool = False):
    """(alpha_t, sigma_t, lambda_t) at sigma: the VP noise-to-signal ratio, or with ``flow`` the
    flow-matching noise level (x_t = (1 - sigma) x0 + sigma noise)."""
    alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma, flow)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def dpmpp_first_order_update(sample, x0, sigma_s, sigma_t, sde: bool, noise=None, flow: bool = False):
    """DPM-Solver++(1) = DDIM in lambda time; with ``sde`` the stochastic version."""
    alpha_t, s_t, lambda_t = alpha_sigma_lambda(sigma_t, flow)
    _, s_s, lambda_s = alpha_sigma_lambda(sigma_s, flow)
    h = lambda_t - lambda_s
    if not sde:
        return s_t / s_s * sample - alpha_t * (torch.exp(-h) - 1.0) * x0
    return (s_t / s_s * torch.exp(-h)) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * x0 \
        + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


def dpmpp_2m_update(sample, m0, m1, sigma_t, sigma_s0, sigma_s1, sde: bool, solver_type: str, noise=None,
                    flow: bool = False):
    """DPM-Solver++(2M): a second-order step from x0 estimates m0 (at s0) and m1 (at s1)."""
    alpha_t, s_t, lambda_t = alpha_sigma_lambda(sigma_t, flow)
    _, s_s0, lambda_s0 = alpha_sigma_lambda(sigma_s0, flow)
    _, _, lambda_s1 = alpha_sigma_lambda(sigma_s1, flow)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    if not sde:
        x_t = s_t / s_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * d0
        if solver_type == "midpoint":
            return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        return x_t + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * d1
    x_t = (s_t / s_s0 * torch.exp(-h)) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * d0
    if solver_type == "midpoint":
        x_t = x_t + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
    else:
        x_t = x_t + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * d1
    return x_t + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise


def dpmpp_3m_update(sample, m0, m1, m2, sigma_t, sigma_s0, sigma_s1, sigma_s2, sde: bool, noise=None,
                    flow: bool = False):
    """DPM-Solver++(3M): a third-order step from the last three x0 estimates."""
    alpha_t, s_t, lambda_t = alpha_sigma_lambda(sigma_t, flow)
    _, s_s0, lambda_s0 = alpha_sigma_lambda(sigma_s0, flow)
    _, _, lambda_s1 = alpha_sigma_lambda(sigma_s1, flow)
    _, _, lambda_s2 = alpha_sigma_lambda(sigma_s2, flow)
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    if not sde:
        return (s_t / s_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * m0
                + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * d1
                - alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5) * d2)
    return ((s_t / s_s0 * torch.exp(-h)) * sample + alpha_t * (1.0 - torch.exp(-2.0 * h)) * m0
            + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * d1
            + alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
            + s_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def x0_from_vp_output(prediction_type: str, model_output, sample, sigma, flow: bool = False):
    """x0 estimate at noise level sigma for the multistep solvers (``flow``: flow-matching sigmas).

    ``flow_prediction`` (velocity noise - x0) gives x0 = x - sigma * v, with the schedule's raw
    sigma whichever the schedule is (diffusers' formula).
    """
    if prediction_type == "sample":
        return model_output
    if prediction_type == "flow_prediction":
        return sample - sigma * model_output
    alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma, flow)
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    return alpha_t * sample - sigma_t * model_output  # v_prediction


class DPMSolverMultistepScheduler(SchedulerMixin):
    """DPM-Solver++ 1/2/3M (ODE) and SDE-DPM-Solver++; with use_karras_sigmas, "DPM++ 2M Karras"."""

    order = 1
    _missing_timestep_is_last = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: str | None = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, (*PREDICTION_TYPES, "flow_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        # diffusers only reads time_shift_type to check set_timesteps(mu=...); a typo is refused here
        check_choice(name, "time_shift_type", time_shift_type, ("exponential", "linear"))
        # diffusers maps "deis" to dpmsolver++ and the UniPC/DEIS solver types to midpoint, in the config
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        self.algorithm_type = self.config.algorithm_type
        check_choice(name, "algorithm_type", self.algorithm_type, (*ALGORITHMS, "deis"))
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        self.solver_type = self.config.solver_type
        check_choice(name, "solver_type", self.solver_type, ("midpoint", "heun", "logrho", "bh1", "bh2"))
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ConfigError(f"{name}: final_sigmas_type='zero' does not work with algorithm_type="
                              f"{algorithm_type!r} (diffusers rejects it too); use final_sigmas_type='sigma_min' "
                              "or algorithm_type='dpmsolver++' / 'sde-dpmsolver++'")
        check_choice(name, "solver_order", solver_order, (1, 2, 3))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice(name, "variance_type", variance_type, (None, "learned", "learned_range"))
        check_one_respacing(name, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                            use_beta_sigmas=use_beta_sigmas)
        # set_timesteps(mu=...) replaces the flow shift by exp(mu) for this and later schedules, as
        # diffusers does (it overwrites config.flow_shift's attribute; the config itself stays as built)
        self.flow_shift = flow_shift
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                                 rescale_betas_zero_snr, zero_snr_floor=True, scheduler=name)
        self.lambda_t = torch.log(torch.sqrt(self.alphas_cumprod)) - torch.log(torch.sqrt(1 - self.alphas_cumprod))
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self._reset_run(solver_order)

    def _reset_run(self, solver_order: int) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu=None, timesteps=None) -> None:
        cfg, name = self.config, type(self).__name__
        if (num_inference_steps is None) == (timesteps is None):
            raise InputError(f"{name}.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        respacing = cfg.use_karras_sigmas or cfg.use_lu_lambdas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas
        if timesteps is not None and respacing:
            raise InputError(f"{name}.set_timesteps: custom timesteps cannot be used with this config's sigma respacing")
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise InputError(f"{name}.set_timesteps: mu needs use_dynamic_shifting=True and "
                                 f"time_shift_type='exponential' (got use_dynamic_shifting={cfg.use_dynamic_shifting}, "
                                 f"time_shift_type={cfg.time_shift_type!r})")
            self.flow_shift = float(np.exp(mu))
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
            n = len(ts)
        else:
            n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last = cfg.num_train_timesteps - int(clipped)
            ts = spaced_timesteps(cfg.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset, solver_grid=True,
                                  last_timestep=last, scheduler=name).astype(np.int64)
        table = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(table)
        if cfg.use_lu_lambdas:  # uniform in log-SNR (Lu et al. 2022, "uniform lambda")
            lambdas = np.flip(log_sigmas.copy())
            ramp = np.linspace(0, 1, n)
            sigmas = np.exp(lambdas[0].item() + ramp * (lambdas[-1].item() - lambdas[0].item()))
            ts = sigma_to_t(sigmas, log_sigmas)
            ts = ts if cfg.beta_schedule == "squaredcos_cap_v2" else ts.round()
        elif respacing:
            sigmas = respace_sigmas(cfg, np.flip(table).copy(), n)
            ts = sigma_to_t(sigmas, log_sigmas)
            if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif cfg.use_flow_sigmas:  # flow matching: sigma = 1 - t/T, shifted; the timesteps are sigma * T
            sigmas = flow_sigmas(n, cfg.num_train_timesteps, self.flow_shift)
            ts = sigmas * cfg.num_train_timesteps
        else:
            sigmas = interp_sigmas(ts, table)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = float(table[0])
        else:
            sigma_last = 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self._reset_run(cfg.solver_order)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """The model output as an x0 estimate (the data-prediction form DPM-Solver++ integrates)."""
        cfg, flow = self.config, self.config.use_flow_sigmas
        if cfg.prediction_type == "epsilon" and cfg.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        sigma = self.sigmas[self._step_index]
        if self.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = x0_from_vp_output(cfg.prediction_type, model_output, sample, sigma, flow)
            if cfg.thresholding:
                x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0
        # DPM-Solver (noise-prediction form): the noise estimate
        if cfg.prediction_type == "flow_prediction":
            raise ConfigError(f"{type(self).__name__}: prediction_type='flow_prediction' needs algorithm_type "
                              f"'dpmsolver++' or 'sde-dpmsolver++', not {self.algorithm_type!r} (diffusers rejects it too)")
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma, flow)
        if cfg.prediction_type == "epsilon":
            eps = model_output
        elif cfg.prediction_type == "sample":
            eps = (sample - alpha_t * model_output) / sigma_t
        else:
            eps = alpha_t * model_output + sigma_t * sample
        if cfg.thresholding:
            x0 = threshold_sample((sample - sigma_t * eps) / alpha_t, cfg.dynamic_thresholding_ratio,
                                  cfg.sample_max_value)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, variance_noise=None,
             return_dict: bool = True):
        self._require_timesteps()
        cfg, i, n = self.config, self._current_index(timestep), len(self.timesteps)
        short = cfg.lower_order_final and n < 15  # few steps: drop the order near the end for stability
        first_order_final = i == n - 1 and (cfg.euler_at_final or short or cfg.final_sigmas_type == "zero")
        second_order_final = i == n - 2 and short
        x0 = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [x0]
        sample = sample.to(torch.float32)
        sde = self.algorithm_type.startswith("sde-")
        noise_form = self.algorithm_type in ("dpmsolver", "sde-dpmsolver")
        noise = None
        if sde and variance_noise is None:
            noise = randn_tensor(x0.shape, generator, x0.device, torch.float32)
        elif sde:
            noise = variance_noise.to(device=x0.device, dtype=torch.float32)
        s, flow = self.sigmas, cfg.use_flow_sigmas
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or first_order_final:
            first = dpm_noise_first_order_update if noise_form else dpmpp_first_order_update
            prev_sample = first(sample, x0, s[i], s[i + 1], sde, noise, flow=flow)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or second_order_final:
            m1, m0 = self.model_outputs[-2:]
            second = dpm_noise_2m_update if noise_form else dpmpp_2m_update
            prev_sample = second(sample, m0, m1, s[i + 1], s[i], s[i - 1], sde, self.solver_type, noise, flow=flow)
        else:
            m2, m1, m0 = self.model_outputs[-3:]
            if self.algorithm_type == "sde-dpmsolver":
                raise InputError(f"{type(self).__name__}.step: solver_order=3 has no sde-dpmsolver update "
                                 "(diffusers has none either); use solver_order=2 or algorithm_type='sde-dpmsolver++'")
            if noise_form:
                prev_sample = dpm_noise_3m_update(sample, m0, m1, m2, s[i + 1], s[i], s[i - 1], s[i - 2], flow=flow)
            else:
                prev_sample = dpmpp_3m_update(sample, m0, m1, m2, s[i + 1], s[i], s[i - 1], s[i - 2], sde, noise,
                                              flow=flow)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        prev_sample = prev_sample.to(x0.dtype)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._sigma_indices(timesteps)].flatten()
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))  # (B, 1, 1, 1)
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma, self.config.use_flow_sigmas)
        return alpha_t * original_samples + sigma_t * noise
