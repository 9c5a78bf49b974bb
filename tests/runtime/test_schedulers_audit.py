"""Config audit against diffusers 0.42.1: every ``__init__`` parameter of the ten schedulers.

1. Same parameter names and defaults as diffusers' classes (``inspect.signature``).
2. Every parameter, moved off its default (each value its ``Literal`` annotation names, the other
   boolean, a nudged number), gives diffusers' timesteps, sigmas and trajectory.
3. The short list of values refused where diffusers would build the scheduler and fail later
   (or never), each with a ConfigError naming the argument.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
import warnings

import diffusers
import pytest
import torch

import runtime.schedulers as ours_pkg
from runtime.models.errors import ConfigError

NAMES = sorted(ours_pkg.SCHEDULER_CLASSES)
SHAPE = (1, 4, 8, 8)
ATOL = 1e-6

# Parameters of diffusers' __init__ that ours refuses outright (any non-default value): none.
# Keep this empty unless a parameter truly cannot be implemented; each entry needs a reason.
REFUSED_PARAMETERS: dict[tuple[str, str], str] = {}

# Values diffusers' constructor takes but that can never produce a schedule (it fails later, in
# set_timesteps or step, or silently misbehaves): refused when the scheduler is built.
REFUSED_VALUES = [
    # diffusers' time_shift() knows "exponential" and "linear"; any other value returns None
    ("UniPCMultistepScheduler", "time_shift_type", "cubic"),
    ("DPMSolverMultistepScheduler", "time_shift_type", "cubic"),
    # diffusers raises in set_timesteps / step for these
    ("DDIMScheduler", "timestep_spacing", "uniform"),
    ("EulerDiscreteScheduler", "prediction_type", "flow_prediction"),
    ("DPMSolverMultistepScheduler", "variance_type", "fixed_small"),
]

# Values that only make sense with a companion setting (diffusers needs it too).
COMPANIONS = {
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"): {"final_sigmas_type": "sigma_min"},
    ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver"): {"final_sigmas_type": "sigma_min"},
    ("UniPCMultistepScheduler", "use_dynamic_shifting", True): {"use_flow_sigmas": True},
    ("UniPCMultistepScheduler", "shift_terminal", 0.2): {"use_flow_sigmas": True},
    ("EulerDiscreteScheduler", "sigma_min", 0.05): {"use_karras_sigmas": True},
    ("EulerDiscreteScheduler", "sigma_max", 10.0): {"use_karras_sigmas": True},
    ("UniPCMultistepScheduler", "sigma_min", 0.05): {"use_karras_sigmas": True},
    ("UniPCMultistepScheduler", "sigma_max", 10.0): {"use_karras_sigmas": True},
}
SET_TIMESTEPS = {("UniPCMultistepScheduler", "use_dynamic_shifting", True): {"mu": 0.7}}
# learned variances need a 2C-channel model output: tested separately below
SEPARATE = {("DDPMScheduler", "variance_type"), ("DPMSolverMultistepScheduler", "variance_type")}


def init_params(cls):
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    return {p.name: p for p in list(inspect.signature(init).parameters.values())[1:]}


def normalized(value):
    return list(value) if isinstance(value, tuple) else value  # () and [] are the same config value


@pytest.mark.parametrize("name", NAMES)
def test_init_parameters_and_defaults_match_diffusers(name):
    theirs = init_params(getattr(diffusers, name))
    ours = init_params(getattr(ours_pkg, name))
    assert list(ours) == list(theirs), f"{name}: parameter names/order differ"
    for key, p in theirs.items():
        if (name, key) in REFUSED_PARAMETERS:
            continue
        a, b = normalized(ours[key].default), normalized(p.default)
        same = (a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        assert same and type(a) is type(b), f"{name}.{key}: default {a!r} != diffusers' {b!r}"


def literal_values(annotation):
    found = []
    stack = [annotation]
    while stack:
        a = stack.pop()
        if typing.get_origin(a) is typing.Literal:
            found += list(typing.get_args(a))
        elif typing.get_origin(a) in (typing.Union, types.UnionType):
            stack += list(typing.get_args(a))
    return found


def off_default_values(name, p):
    d = p.default
    values = [v for v in literal_values(p.annotation) if v != d]
    if isinstance(d, bool):
        values.append(not d)
    elif p.name == "num_train_timesteps":
        values.append(500)
    elif isinstance(d, int) and p.name != "solver_order":
        values.append(d + 1)
    elif p.name == "solver_order":
        values += [v for v in (1, 3) if v != d]
    elif isinstance(d, float):
        values.append(-5.1 if not math.isfinite(d) else (d * 0.8 if d >= 1 else d * 1.5))
    elif p.name in ("sigma_min", "sigma_max"):
        values.append(0.05 if p.name == "sigma_min" else 10.0)
    elif p.name == "shift_terminal":
        values.append(0.2)
    elif p.name == "disable_corrector":
        values.append([0, 2])
    return values


SWEEP = [(name, key, v) for name in NAMES for key, p in init_params(getattr(diffusers, name)).items()
         if (name, key) not in SEPARATE for v in off_default_values(name, p)]


def fake_model(x, t, noise):
    return 0.1 * x + math.sin(float(t) / 100.0) * noise


def assert_close(a, b, what):
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    assert err <= ATOL * scale, f"{what}: max-abs error {err:.3g} > {ATOL * scale:.3g}"


def trajectory(sched, x, noise, takes_generator):
    gen = torch.Generator().manual_seed(11)
    out = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        kw = {"generator": gen} if takes_generator else {}
        x = sched.step(fake_model(x_in, t, noise), t, x, **kw).prev_sample
        out.append((x_in, x))
    return out


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("name,key,value", SWEEP, ids=lambda v: str(v).replace("Scheduler", ""))
def test_every_parameter_off_its_default_matches_diffusers(name, key, value, steps):
    hashable = not isinstance(value, list)
    config = {key: value, **(COMPANIONS.get((name, key, value), {}) if hashable else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, name)(**config)
        ours = getattr(ours_pkg, name)(**config)
        set_kw = SET_TIMESTEPS.get((name, key, value), {}) if hashable else {}
        ref.set_timesteps(steps, **set_kw)
        ours.set_timesteps(steps, **set_kw)
        assert ours.timesteps.dtype == ref.timesteps.dtype
        assert_close(ours.timesteps, ref.timesteps, "timesteps")
        if hasattr(ref, "sigmas"):
            assert_close(ours.sigmas, ref.sigmas, "sigmas")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=g) * float(ref.init_noise_sigma)
        noise = torch.randn(SHAPE, generator=g)
        takes_generator = "generator" in inspect.signature(ref.step).parameters
        mine = trajectory(ours, x, noise, takes_generator)
        theirs = trajectory(ref, x, noise, takes_generator)
    for i, ((a_in, a), (b_in, b)) in enumerate(zip(mine, theirs)):
        assert_close(a_in, b_in, f"scale_model_input at step {i}")
        if not torch.isfinite(b).all():  # diffusers' own result is inf/NaN (bh1 with a zero final
            # sigma, LCM's epsilon at zero terminal SNR): ours must break down the same way
            assert not torch.isfinite(a).all(), f"step {i}: diffusers gives inf/NaN, ours does not"
            break
        assert_close(a, b, f"prev_sample at step {i}")


@pytest.mark.parametrize("name", ["DDPMScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_types_match_diffusers(name, variance_type):
    ref = getattr(diffusers, name)(variance_type=variance_type)
    ours = getattr(ours_pkg, name)(variance_type=variance_type)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    out = torch.randn(1, 6, 8, 8, generator=g)  # (mean, variance) channels
    out[:, 3:] = out[:, 3:].abs() * 0.5 + 0.01  # "learned" is the variance itself: keep it positive
    xa = xb = x
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for i, t in enumerate(ref.timesteps):
        xa = ours.step(out + 0.1 * torch.cat([xa, 0 * xa], 1), t, xa, generator=ga).prev_sample
        xb = ref.step(out + 0.1 * torch.cat([xb, 0 * xb], 1), t, xb, generator=gb).prev_sample
        assert torch.isfinite(xb).all()
        assert_close(xa, xb, f"prev_sample at step {i}")


@pytest.mark.parametrize("name,key,value", REFUSED_VALUES)
def test_refused_values_are_config_errors_naming_the_argument(name, key, value):
    with pytest.raises(ConfigError, match=f"{key}={value!r}"):
        getattr(ours_pkg, name)(**{key: value})


@pytest.mark.parametrize("name,key", sorted(REFUSED_PARAMETERS))
def test_refused_parameters_are_config_errors_naming_the_argument(name, key):
    p = init_params(getattr(diffusers, name))[key]
    with pytest.raises(ConfigError, match=key):
        getattr(ours_pkg, name)(**{key: off_default_values(name, p)[0]})
