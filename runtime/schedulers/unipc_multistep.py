"""UniPC multistep (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework").

Each step first corrects the current sample with the new model output (UniC, Algorithm 2), then
predicts the next one (UniP, Algorithm 1); ``solver_type`` picks B(h) = h ("bh1") or e^h - 1
("bh2").
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
    spaced_timesteps,
    threshold_sample,
)
from .dpmsolver_multistep import alpha_sigma_lambda, x0_from_vp_output
from .sigma_schedules import (
    check_one_respacing,
    interp_sigmas,
    respace_sigmas,
    shift_flow_sigmas,
    sigma_to_alpha_sigma_t,
    sigma_to_t,
    stretch_to_terminal,
    time_shift,
    train_sigmas,
)


def unipc_coefficients(h, lambda_s0, earlier_lambdas, predict_x0: bool, solver_type: str):
    """(rks, R, b, h_phi_1, B_h) of UniPC for the previous points' log-SNRs ``earlier_lambdas``."""
    rks = [(lam - lambda_s0) / h for lam in earlier_lambdas] + [torch.ones(())]
    rks = torch.stack(rks)
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    R, b, factorial_i = [], [], 1
    for i in range(1, len(rks) + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return rks, torch.stack(R), torch.stack(b), h_phi_1, b_h


def _combine(rhos, d1s):
    return torch.einsum("k,bkc...->bc...", rhos, d1s)  # sum_k rho_k D1_k over (B, K, C, ...)


def _base_step(x, m0, sigma_t, sigma_s0, h_phi_1, predict_x0: bool, flow: bool):
    alpha_t, s_t = sigma_to_alpha_sigma_t(sigma_t, flow)
    alpha_s0, s_s0 = sigma_to_alpha_sigma_t(sigma_s0, flow)
    if predict_x0:
        return s_t / s_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
    return alpha_t / alpha_s0 * x - s_t * h_phi_1 * m0, s_t


def unipc_predict(x, outputs, sigmas, predict_x0: bool, solver_type: str, flow: bool = False):
    """UniP-p: x at sigmas[0] -> the next point sigmas_next; ``outputs``/``sigmas`` newest first.

    ``sigmas`` = [sigma_next, sigma_s0, sigma_s1, ...]; ``outputs`` = [m0, m1, ...] (len = order).
    """
    _, _, lambda_t = alpha_sigma_lambda(sigmas[0], flow)
    _, _, lambda_s0 = alpha_sigma_lambda(sigmas[1], flow)
    h = lambda_t - lambda_s0
    earlier = [alpha_sigma_lambda(s, flow)[2] for s in sigmas[2:]]
    rks, R, b, h_phi_1, b_h = unipc_coefficients(h, lambda_s0, earlier, predict_x0, solver_type)
    m0 = outputs[0]
    x_t_, scale = _base_step(x, m0, sigmas[0], sigmas[1], h_phi_1, predict_x0, flow)
    if len(outputs) == 1:
        return (x_t_ - scale * b_h * 0).to(x.dtype)
    d1s = torch.stack([(mi - m0) / rk for mi, rk in zip(outputs[1:], rks[:-1])], dim=1)  # (B, K, C, ...)
    if len(outputs) == 2:
        rhos_p = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(x.device).to(x.dtype)
    return (x_t_ - scale * b_h * _combine(rhos_p, d1s)).to(x.dtype)


def unipc_correct(x, model_t, outputs, sigmas, predict_x0: bool, solver_type: str, flow: bool = False):
    """UniC-p: refine the sample at sigmas[0] with its own model output ``model_t``.

    ``x`` is the sample at sigmas[1] the last prediction started from; ``outputs`` = [m0, m1, ...]
    are the outputs at sigmas[1:], newest first.
    """
    _, _, lambda_t = alpha_sigma_lambda(sigmas[0], flow)
    _, _, lambda_s0 = alpha_sigma_lambda(sigmas[1], flow)
    h = lambda_t - lambda_s0
    earlier = [alpha_sigma_lambda(s, flow)[2] for s in sigmas[2:]]
    rks, R, b, h_phi_1, b_h = unipc_coefficients(h, lambda_s0, earlier, predict_x0, solver_type)
    m0 = outputs[0]
    x_t_, scale = _base_step(x, m0, sigmas[0], sigmas[1], h_phi_1, predict_x0, flow)
    if len(outputs) == 1:
        rhos_c = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
        corr_res = 0
    else:
        rhos_c = torch.linalg.solve(R, b).to(x.device).to(x.dtype)
        d1s = torch.stack([(mi - m0) / rk for mi, rk in zip(outputs[1:], rks[:-1])], dim=1)  # (B, K, C, ...)
        corr_res = _combine(rhos_c[:-1], d1s)
    return (x_t_ - scale * b_h * (corr_res + rhos_c[-1] * (model_t - m0))).to(x.dtype)


class UniPCMultistepScheduler(SchedulerMixin):
    """UniPC with bh1/bh2, orders 1-3, and the corrector on every step but the first."""

    order = 1
    _missing_timestep_is_last = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, predict_x0: bool = True, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: list = (), solver_p=None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, timestep_spacing: str = "linspace",
                 steps_offset: int = 0, final_sigmas_type: str = "zero", rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential", sigma_min: float | None = None,
                 sigma_max: float | None = None, shift_terminal: float | None = None):
        name = type(self).__name__
        check_choice(name, "prediction_type", prediction_type, (*PREDICTION_TYPES, "flow_prediction"))
        check_choice(name, "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.solver_type = "bh2" if solver_type in ("midpoint", "heun", "logrho") else solver_type
        check_choice(name, "solver_type", self.solver_type, ("bh1", "bh2"))
        check_choice(name, "solver_order", solver_order, (1, 2, 3))
        check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_one_respacing(name, use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                            use_beta_sigmas=use_beta_sigmas)
        # diffusers' time_shift knows these two (a typo there fails later, in set_timesteps)
        check_choice(name, "time_shift_type", time_shift_type, ("exponential", "linear"))
        if shift_terminal is not None and not use_flow_sigmas:
            raise ConfigError(f"{name}: shift_terminal={shift_terminal!r} needs use_flow_sigmas=True "
                              "(diffusers rejects it too)")
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                                 rescale_betas_zero_snr, zero_snr_floor=True, scheduler=name)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.predict_x0 = predict_x0
        self.disable_corrector = list(disable_corrector)
        self.solver_p = solver_p
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self._reset_run(solver_order)

    def _reset_run(self, solver_order: int) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.timestep_list: list = [None] * solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = None
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None) -> None:
        """The schedule: VP sigmas (optionally respaced) or, with use_flow_sigmas, flow-matching
        sigmas 1 - t/T shifted by flow_shift (or by mu with use_dynamic_shifting); ``sigmas``
        replaces the flow grid (use_flow_sigmas only), as in diffusers."""
        cfg, name = self.config, type(self).__name__
        if cfg.use_dynamic_shifting and mu is None:
            raise InputError(f"{name}.set_timesteps: use_dynamic_shifting=True needs mu")
        custom = None
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise InputError(f"{name}.set_timesteps: custom sigmas need use_flow_sigmas=True in the config")
            custom = np.array(sigmas, dtype=np.float64).reshape(-1)
            num_inference_steps = len(custom)
        n = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps, name)
        ts = spaced_timesteps(cfg.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset, solver_grid=True,
                              scheduler=name).astype(np.int64)
        table = train_sigmas(self.alphas_cumprod) if custom is None else custom
        respaced = respace_sigmas(cfg, np.flip(table).copy(), n)
        if respaced is not None:
            sigmas, sigma_last = respaced, respaced[-1]
            if cfg.use_karras_sigmas and cfg.use_flow_sigmas:  # Karras levels mapped to flow sigmas
                sigmas = sigmas / (sigmas + 1)
                ts, sigma_last = sigmas * cfg.num_train_timesteps, sigmas[-1]
            else:
                ts = sigma_to_t(respaced, np.log(table))
                ts = ts.round() if cfg.use_karras_sigmas else ts
        elif cfg.use_flow_sigmas:
            sigmas = custom if custom is not None else np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)[:-1]
            if cfg.use_dynamic_shifting:
                sigmas = time_shift(cfg.time_shift_type, mu, sigmas)
            else:
                sigmas = shift_flow_sigmas(sigmas, cfg.flow_shift)
            if cfg.shift_terminal:
                sigmas = stretch_to_terminal(sigmas, cfg.shift_terminal)
            sigmas = np.array(sigmas, dtype=np.float64)
            if abs(sigmas[0] - 1) < 1e-6:  # sigma = 1 has alpha = 0: an infinite log-SNR on the first steps
                sigmas[0] -= 1e-6
            ts, sigma_last = sigmas * cfg.num_train_timesteps, sigmas[-1]
        else:
            sigmas, sigma_last = interp_sigmas(ts, table), float(table[0])
        sigma_last = sigma_last if cfg.final_sigmas_type == "sigma_min" else 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(ts)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self._reset_run(cfg.solver_order)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """x0 estimate (predict_x0) or noise estimate, the quantity UniPC extrapolates."""
        cfg, flow = self.config, self.config.use_flow_sigmas
        sigma = self.sigmas[self._step_index]
        if self.predict_x0:
            x0 = x0_from_vp_output(cfg.prediction_type, model_output, sample, sigma, flow)
            if cfg.thresholding:
                x0 = threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0
        if cfg.prediction_type == "flow_prediction":
            raise ConfigError(f"{type(self).__name__}: prediction_type='flow_prediction' needs predict_x0=True "
                              "(diffusers rejects it too)")
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma, flow)
        if cfg.prediction_type == "epsilon":
            return model_output
        if cfg.prediction_type == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None):
        """Correct the current sample (UniC), then predict the next (UniP); ``generator`` is unused."""
        self._require_timesteps()
        cfg, i, s = self.config, self._current_index(timestep), self.sigmas
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            k = self.this_order
            outputs = self.model_outputs[::-1][:k]  # newest first
            sample = unipc_correct(self.last_sample, converted, outputs, [s[i - j] for j in range(k + 1)],
                                   self.predict_x0, self.solver_type, cfg.use_flow_sigmas)
        self.model_outputs = self.model_outputs[1:] + [converted]
        self.timestep_list = self.timestep_list[1:] + [timestep]
        this_order = min(cfg.solver_order, len(self.timesteps) - i) if cfg.lower_order_final else cfg.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        if self.solver_p is not None:
            prev_sample = self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        else:
            k = self.this_order
            outputs = self.model_outputs[::-1][:k]
            prev_sample = unipc_predict(sample, outputs, [s[i + 1]] + [s[i - j] for j in range(k)],
                                        self.predict_x0, self.solver_type, cfg.use_flow_sigmas)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._sigma_indices(timesteps)].flatten()
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))  # (B, 1, 1, 1)
        alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma, self.config.use_flow_sigmas)
        return alpha_t * original_samples + sigma_t * noise
