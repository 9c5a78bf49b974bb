"""Noise-level (sigma) schedules as plain functions, in the k-diffusion style.

sigma(t) = sqrt((1 - abar_t) / abar_t) is the noise-to-signal ratio of the VP process; the
sigma-based schedulers (Euler, Heun, LMS, DPM-Solver, UniPC) walk a descending list of sigmas.
Numbers follow diffusers' float64 numpy arithmetic so schedules match it exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from runtime.models.errors import ConfigError


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma at every training timestep, ascending in t (float32, as diffusers computes it)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def interp_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Linear interpolation of the training sigmas at (possibly fractional) timesteps."""
    return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """The rho-spaced noise levels of Karras et al. 2022 (EDM), eq. 5, descending."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log(sigma), descending."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Noise levels placed by a Beta(alpha, beta) quantile ramp (Lee et al. 2024); needs scipy."""
    try:
        import scipy.stats
    except ImportError:
        raise ConfigError("use_beta_sigmas=True needs scipy; install scipy or use use_karras_sigmas") from None
    ramp = 1 - np.linspace(0, 1, num_steps)
    return np.array([sigma_min + scipy.stats.beta.ppf(p, alpha, beta) * (sigma_max - sigma_min) for p in ramp])


def shift_flow_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The resolution shift of flow-matching sigmas (Esser et al. 2024, SD3 eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(num_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """DPM-Solver's flow-matching noise levels: 1 - t/T on a uniform grid, shifted, descending
    (diffusers builds them as alphas = linspace(1, 1/T, n + 1) and drops sigma = 0)."""
    sigmas = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_steps + 1)
    return np.flip(shift_flow_sigmas(sigmas, shift))[:-1].copy()


def time_shift(kind: str, mu: float, sigmas: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Dynamic (resolution-dependent) shifting of flow sigmas by mu (Flux): exp(mu) or mu."""
    shift = math.exp(mu) if kind == "exponential" else mu
    return shift / (shift + (1 / sigmas - 1) ** sigma)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Rescale 1 - sigma so the last sigma equals ``terminal`` (LTX-Video's shift_terminal)."""
    one_minus = 1 - sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating log(sigma) between neighbours."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def respace_sigmas(config, sigmas: np.ndarray, num_steps: int) -> np.ndarray | None:
    """The Karras / exponential / beta respacing a config asks for, or None for none.

    ``sigmas`` is descending; its ends (or config.sigma_min / sigma_max where set) bound the ramp.
    """
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else float(sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(sigmas[0])
    if config.get("use_karras_sigmas"):
        return karras_sigmas(sigma_min, sigma_max, num_steps)
    if config.get("use_exponential_sigmas"):
        return exponential_sigmas(sigma_min, sigma_max, num_steps)
    if config.get("use_beta_sigmas"):
        return beta_sigmas(sigma_min, sigma_max, num_steps)
    return None


def check_one_respacing(scheduler: str, **flags) -> None:
    """ConfigError when more than one of use_karras/exponential/beta_sigmas is true."""
    chosen = [k for k, v in flags.items() if v]
    if len(chosen) > 1:
        raise ConfigError(f"{scheduler}: only one of {', '.join(chosen)} can be true")


def sigma_to_alpha_sigma_t(sigma: torch.Tensor, flow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process from the noise-to-signal ratio sigma; with ``flow``,
    of the flow-matching path x_t = (1 - sigma) x0 + sigma noise."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t
