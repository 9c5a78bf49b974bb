"""What every scheduler shares: config loading (``scheduler_config.json``) and beta schedules.

Schedulers keep diffusers' interface and keep their state on the instance as diffusers does;
pipelines take a private copy per call (``scheduler.fresh_copy()``), so concurrent calls never
share step state. The math lives in plain functions beside each class.
"""
from __future__ import annotations

import copy
import math
import os

import torch

from models.config import ConfigMixin
from models.errors import ConfigError, InputError


class SchedulerMixin(ConfigMixin):
    config_name = "scheduler_config.json"
    warn_unknown_config_keys = False  # configs are interchanged between schedulers
    order: int = 1

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs):
        config = cls.load_config(path_or_id, subfolder=subfolder, **hub_kwargs)
        return cls.from_config(config, _source=f"{path_or_id}/{subfolder or ''}/{cls.config_name}")

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        self.save_config(save_directory)

    def fresh_copy(self):
        """An independent copy for one pipeline call (its own timesteps and step state)."""
        return copy.deepcopy(self)

    @property
    def compatibles(self) -> list[str]:
        from . import SCHEDULER_CLASSES

        return sorted(SCHEDULER_CLASSES)


def betas_for_alpha_bar(num_steps: int, alpha_transform_type: str = "cosine", max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretize a continuous alpha-bar(t) (Nichol & Dhariwal 2021, squaredcos_cap_v2)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    else:
        raise ConfigError(f"unsupported alpha_transform_type: {alpha_transform_type!r}")
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None) -> torch.Tensor:
    """The training noise schedule named by a scheduler config (diffusers' beta_schedule values)."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ConfigError(
        f"unsupported beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2"
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int, name: str) -> None:
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise InputError(f"{name}: num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if num_inference_steps > num_train_timesteps:
        raise InputError(
            f"{name}: num_inference_steps={num_inference_steps} is more than the "
            f"{num_train_timesteps} training timesteps (num_train_timesteps)"
        )
