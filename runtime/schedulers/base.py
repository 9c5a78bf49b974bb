"""What every scheduler shares: config loading (``scheduler_config.json``), beta schedules,
the step-index machinery and the small math helpers (thresholding, noise, add_noise).

Schedulers keep diffusers' interface and keep the state of one denoising run on the instance,
as diffusers does; pipelines take a private copy per call (``scheduler.fresh_copy()``), so
concurrent calls never share step state. The math lives in plain functions beside each class.

The step index: a run counts its steps (``_step_index``) from the first ``scale_model_input``
or ``step`` call; the start comes from ``set_begin_index`` (img2img) or, once per run, from
looking the first timestep up in the schedule. Steps must therefore come in schedule order,
once per timestep, as every pipeline calls them; nothing searches the schedule per step.
"""
from __future__ import annotations

import copy
import math
import operator

import numpy as np
import torch

from runtime.models.errors import ConfigError, InputError
from runtime.models.noise import randn_tensor  # noqa: F401  (re-exported for the schedulers)

from .outputs import SchedulerOutput  # noqa: F401  (re-exported)
from .scheduler_config import USE_DEFAULT_VALUES, SchedulerConfigMixin, register_to_config  # noqa: F401

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


class SchedulerMixin(SchedulerConfigMixin):
    """Config I/O with diffusers' scheduler semantics, plus the step index of one run."""

    order: int = 1
    _step_index: int | None = None
    _begin_index: int | None = None

    def fresh_copy(self):
        """An independent copy for one pipeline call (its own timesteps and step state)."""
        return copy.deepcopy(self)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def compatibles(self) -> list:
        from . import SCHEDULER_CLASSES

        return [SCHEDULER_CLASSES[name] for name in sorted(SCHEDULER_CLASSES)]

    # ---- the step index of one run ---------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (img2img pipelines call this)."""
        self._begin_index = int(begin_index)

    def _timestep_position(self, timestep: torch.Tensor) -> int | None:
        """Where an accelerator tensor sits in ``self.timesteps`` when it is one of its elements.

        Pipelines pass ``for t in scheduler.timesteps`` elements: views into the schedule, whose
        position is known without copying the value back to the host (no device sync).
        """
        schedule = getattr(self, "timesteps", None)
        if (not isinstance(schedule, torch.Tensor) or schedule.device != timestep.device
                or not schedule.is_contiguous() or timestep.dtype != schedule.dtype
                or timestep.untyped_storage().data_ptr() != schedule.untyped_storage().data_ptr()):
            return None
        position = timestep.storage_offset() - schedule.storage_offset()
        return position if 0 <= position < schedule.shape[0] else None

    def timestep_value(self, timestep, what: str = "timestep"):
        """The number a timestep argument names: a Python number or a 0-d / 1-element tensor."""
        name = type(self).__name__
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise InputError(f"{name}: {what} must be a number or a 1-element tensor, "
                                 f"got a tensor of shape {tuple(timestep.shape)}")
            if timestep.device.type != "cpu":
                position = self._timestep_position(timestep.reshape(()))
                schedule = getattr(self, "_schedule", None)
                if position is not None and schedule is not None and len(schedule) == len(self.timesteps):
                    return schedule[position]
            return timestep.item()
        if isinstance(timestep, np.ndarray) and timestep.size == 1:
            return timestep.item()
        if isinstance(timestep, np.generic):
            return timestep.item()
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise InputError(f"{name}: {what} must be a number or a 1-element tensor, got {timestep!r}")
        return timestep

    def timestep_int(self, timestep, what: str = "timestep") -> int:
        """An integer training timestep in [0, num_train_timesteps); InputError naming it otherwise."""
        value = self.timestep_value(timestep, what)
        t = int(value)
        if t != value or not 0 <= t < self.config.num_train_timesteps:
            raise InputError(f"{type(self).__name__}: {what}={value!r} must be an integer in "
                             f"[0, {self.config.num_train_timesteps}) (num_train_timesteps)")
        return t

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second match where it occurs twice."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = float(self.timestep_value(timestep))
        matches = [i for i, t in enumerate(schedule.tolist()) if t == value]
        if not matches:
            if self._missing_timestep_is_last:
                return len(schedule) - 1
            raise InputError(f"{type(self).__name__}: timestep {value:g} is not in the schedule set by set_timesteps")
        return matches[1] if len(matches) > 1 else matches[0]

    _missing_timestep_is_last = False  # DPM-Solver and UniPC map unknown timesteps to the last step

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)  # once per run, not per step
        else:
            self._step_index = self._begin_index

    def _current_index(self, timestep) -> int:
        """The step index of this ``step`` call (started on the first call of the run)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise InputError(f"{type(self).__name__}.step: all {len(self.timesteps)} steps of the schedule are done; "
                             "call set_timesteps to start a new run")
        return self._step_index

    def _require_timesteps(self) -> None:
        if getattr(self, "num_inference_steps", None) is None:
            raise InputError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def _sigma_indices(self, timesteps) -> list[int]:
        """Schedule positions for add_noise on the sigma-based schedulers (diffusers' rules)."""
        timesteps = as_timesteps(timesteps, type(self).__name__)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.reshape(-1).tolist()]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.reshape(-1).shape[0]


def check_choice(scheduler: str, key: str, value, choices) -> None:
    """ConfigError naming the key and value when a config string is not one we implement."""
    if value not in choices:
        raise ConfigError(f"{scheduler}: unsupported {key}={value!r}; expected one of {', '.join(map(repr, choices))}")


def betas_for_alpha_bar(num_steps: int, alpha_transform_type: str = "cosine", max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretize a continuous alpha-bar(t) (Nichol & Dhariwal 2021, squaredcos_cap_v2)."""
    if alpha_transform_type == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif alpha_transform_type == "exp":
        def alpha_bar(t):
            return math.exp(t * -12.0)
    elif alpha_transform_type == "laplace":
        def alpha_bar(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise ConfigError(f"unsupported alpha_transform_type: {alpha_transform_type!r}")
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what most schedulers take
DDPM_BETA_SCHEDULES = (*BETA_SCHEDULES, "laplace", "sigmoid")
HEUN_BETA_SCHEDULES = (*BETA_SCHEDULES, "exp")


MAX_TRAIN_TIMESTEPS = 100_000


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None, scheduler: str = "scheduler", beta_schedules=BETA_SCHEDULES) -> torch.Tensor:
    """The training noise schedule named by a scheduler config (the beta_schedule values diffusers
    takes for that scheduler, ``beta_schedules``)."""
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) \
            or not 1 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
        # a bound, so a corrupt config is an error rather than a multi-GB schedule or an hour-long loop
        raise ConfigError(f"{scheduler}: num_train_timesteps={num_train_timesteps!r} must be an integer from 1 to "
                          f"{MAX_TRAIN_TIMESTEPS} (released models use 1000)")
    if trained_betas is not None:
        try:
            betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError, OverflowError):
            betas = None
        if betas is None or betas.shape != (num_train_timesteps,) or not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError(f"{scheduler}: trained_betas must be {num_train_timesteps} numbers in (0, 1), one per "
                              f"training timestep (num_train_timesteps); got {str(trained_betas)[:80]}")
        return betas
    if beta_schedule not in beta_schedules:
        raise ConfigError(f"{scheduler}: unsupported beta_schedule={beta_schedule!r}; "
                          f"expected one of {', '.join(beta_schedules)}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule in ("laplace", "exp"):
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type=beta_schedule)
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    raise ConfigError(f"{scheduler}: unsupported beta_schedule={beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_for(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                       trained_betas=None, rescale_betas_zero_snr: bool = False, zero_snr_floor: bool = False,
                       scheduler: str = "scheduler", beta_schedules=BETA_SCHEDULES) -> torch.Tensor:
    """alpha-bar(t) for a config: betas, the optional zero-terminal-SNR rescale, cumprod.

    ``zero_snr_floor``: the sigma-based schedulers replace a zero terminal alpha-bar by 2**-24
    so that sigma stays finite (diffusers does the same).
    """
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, scheduler, beta_schedules)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr and zero_snr_floor:
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int, name: str) -> int:
    """The step count as an int; InputError naming the value when it is not a usable count."""
    try:
        if isinstance(num_inference_steps, bool):
            raise TypeError
        steps = operator.index(num_inference_steps)
    except TypeError:
        raise InputError(f"{name}: num_inference_steps must be a positive integer, got {num_inference_steps!r}") from None
    if steps < 1:
        raise InputError(f"{name}: num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if steps > num_train_timesteps:
        raise InputError(
            f"{name}: num_inference_steps={steps} is more than the "
            f"{num_train_timesteps} training timesteps (num_train_timesteps)"
        )
    return steps


def spaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0, *,
                     round_linspace: bool = True, solver_grid: bool = False, last_timestep: int | None = None,
                     scheduler: str = "scheduler") -> np.ndarray:
    """Descending float64 timesteps for ``timestep_spacing`` (Lin et al. 2023, Table 2).

    ``solver_grid``: the multistep solvers' variant that spaces ``num_steps + 1`` points up to
    ``last_timestep`` and drops the final one.
    """
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        if solver_grid:
            return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].copy()
        grid = np.linspace(0, num_train_timesteps - 1, num_steps)
        return (grid.round() if round_linspace else grid)[::-1].copy()
    if spacing == "leading":
        points = num_steps + 1 if solver_grid else num_steps
        ratio = (last if solver_grid else num_train_timesteps) // points
        grid = (np.arange(0, points) * ratio).round()[::-1]
        return (grid[:-1] if solver_grid else grid).copy() + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(last, 0, -num_train_timesteps / num_steps)) - 1
    raise ConfigError(f"{scheduler}: unsupported timestep_spacing={spacing!r}; expected linspace, leading or trailing")


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of an x0 estimate (Saharia et al. 2022, Imagen section 3.3)."""
    dtype = sample.dtype
    flat = sample.float() if dtype not in (torch.float32, torch.float64) else sample
    flat = flat.reshape(sample.shape[0], -1)  # (B, C*H*W)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)


def as_timesteps(timesteps, scheduler: str = "scheduler") -> torch.Tensor:
    """add_noise's timesteps as a tensor: a tensor, a Python number or a list of numbers."""
    if isinstance(timesteps, torch.Tensor):
        return timesteps
    try:
        return torch.as_tensor(timesteps)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{scheduler}.add_noise: timesteps must be a tensor, a number or a list of numbers, "
                         f"got {timesteps!r}") from None


def _train_index(timesteps, like: torch.Tensor) -> torch.Tensor:
    """Integer training timesteps on ``like``'s device, for indexing alpha-bar."""
    timesteps = as_timesteps(timesteps).to(like.device)
    if timesteps.is_floating_point():
        timesteps = timesteps.long()
    return timesteps


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.flatten()
    return values.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def add_noise_vp(alphas_cumprod: torch.Tensor, original: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0) = sqrt(abar) x_0 + sqrt(1 - abar) eps, abar at integer t."""
    abar = alphas_cumprod.to(device=original.device, dtype=original.dtype)[_train_index(timesteps, original)]
    return _broadcast(abar**0.5, original) * original + _broadcast((1 - abar) ** 0.5, original) * noise


def velocity_vp(alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022), the v-prediction target."""
    abar = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[_train_index(timesteps, sample)]
    return _broadcast(abar**0.5, sample) * noise - _broadcast((1 - abar) ** 0.5, sample) * sample
