"""The scheduler surface custom loops touch, against diffusers 0.42.1: step outputs as dicts,
timestep argument kinds, off-schedule timesteps, PNDM's step_prk / step_plms, trained_betas
through save/load, register_to_config, and DPM-Solver's noise-prediction algorithm types."""
from __future__ import annotations

import inspect
import math
import re

import diffusers
import numpy as np
import pytest
import torch

import runtime.schedulers as ours_pkg
from runtime.models.errors import ConfigError, InputError
from runtime.schedulers.base import register_to_config

NAMES = sorted(ours_pkg.SCHEDULER_CLASSES)
SHAPE = (1, 4, 8, 8)


def both(name, **config):
    return getattr(ours_pkg, name)(**config), getattr(diffusers, name)(**config)


def fake_model(x, t, noise):
    return 0.1 * x + math.sin(float(t) / 100.0) * noise


def assert_close(a, b, what):
    """Max-abs error within 1e-6 of the magnitude; NaN only where diffusers has NaN (its 0/0 at a
    zero-length final step, for example)."""
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN in different places"
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= 1e-6 * scale, f"{what}: max-abs error {err:.3g}"


def step_kwargs(ref, seed=5):
    return {"generator": torch.Generator().manual_seed(seed)} if "generator" in inspect.signature(ref.step).parameters else {}


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


# ---- step outputs --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_step_output_behaves_as_base_output(name):
    ours, ref = both(name)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x, _ = tensors()
    t, t_ref = ours.timesteps[0], ref.timesteps[0]
    out = ours.step(0.3 * ours.scale_model_input(x, t), t, x, **step_kwargs(ref))
    expected = ref.step(0.3 * ref.scale_model_input(x, t_ref), t_ref, x, **step_kwargs(ref))
    assert list(out.keys()) == list(expected.keys())
    assert isinstance(out, dict)
    for key in expected.keys():
        assert_close(out[key], expected[key], f"out[{key!r}]")
        assert_close(getattr(out, key), expected[key], f"out.{key}")
    assert len(out.to_tuple()) == len(expected.to_tuple())
    for (k, v), (k_ref, v_ref), value in zip(out.items(), expected.items(), out.values()):
        assert k == k_ref and value is v
        assert_close(v, v_ref, f"items() {k}")
    assert_close(out[0], expected[0], "out[0]")
    assert out["prev_sample"] is out.prev_sample is out[0]
    with pytest.raises(KeyError):
        out["not_a_field"]
    with pytest.raises(Exception, match=rf"You cannot use ``pop`` on a {type(out).__name__} instance"):  # as diffusers
        out.pop("prev_sample")
    # return_dict=False: the same tuple diffusers returns
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    tup = ours.step(0.3 * ours.scale_model_input(x, t), t, x, return_dict=False, **step_kwargs(ref))
    tup_ref = ref.step(0.3 * ref.scale_model_input(x, t_ref), t_ref, x, return_dict=False, **step_kwargs(ref))
    assert isinstance(tup, tuple) and len(tup) == len(tup_ref)
    for a, b in zip(tup, tup_ref):
        assert_close(a, b, "tuple element")


def test_output_attribute_assignment_updates_the_dict():
    out = ours_pkg.SchedulerOutput(prev_sample=torch.zeros(1))
    assert list(out.keys()) == ["prev_sample"] and out.to_tuple()[0] is out.prev_sample
    out.prev_sample = torch.ones(1)
    assert torch.equal(out["prev_sample"], torch.ones(1))


# ---- timestep argument kinds ---------------------------------------------------------------
def _forms(t: torch.Tensor):
    value = t.item()
    number = int(value) if float(value).is_integer() and not t.is_floating_point() else float(value)
    return {"number": number, "0-d": t.reshape(()), "1-element": t.reshape(1)}


@pytest.mark.parametrize("form", ["number", "0-d", "1-element"])
@pytest.mark.parametrize("name", NAMES)
def test_timestep_kinds_in_step_scale_and_add_noise(name, form):
    """Python numbers, 0-d and 1-element tensors give what diffusers gives for the schedule's own
    elements."""
    ours, ref = both(name)
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    x, noise = tensors(1)
    x_ours = x_ref = x
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        t_arg = _forms(t_ours)[form]
        x_in = ours.scale_model_input(x_ours, t_arg)
        x_in_ref = ref.scale_model_input(x_ref, t_ref)
        assert_close(x_in, x_in_ref, f"scale_model_input at step {i}")
        x_ours = ours.step(fake_model(x_in, t_ref, noise), t_arg, x_ours, **step_kwargs(ref, i)).prev_sample
        x_ref = ref.step(fake_model(x_in_ref, t_ref, noise), t_ref, x_ref, **step_kwargs(ref, i)).prev_sample
        assert_close(x_ours, x_ref, f"prev_sample at step {i}")
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    t_arg = _forms(ours.timesteps[2])[form]
    assert_close(ours.add_noise(x, noise, t_arg), ref.add_noise(x, noise, ref.timesteps[2:3]), "add_noise")


def test_bad_timestep_arguments_are_input_errors():
    ddim = ours_pkg.DDIMScheduler()
    ddim.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(InputError, match="timestep.*shape \\(2,\\)"):
        ddim.step(x, torch.tensor([901, 801]), x)
    with pytest.raises(InputError, match="timestep=1000 must be an integer in \\[0, 1000\\)"):
        ddim.step(x, 1000, x)
    with pytest.raises(InputError, match="timestep must be a number"):
        ddim.step(x, "901", x)
    ddpm = ours_pkg.DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(InputError, match="timestep 905 is not in the schedule"):
        ddpm.step(x, 905, x)


# ---- off-schedule timesteps ----------------------------------------------------------------
@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "clip_sample": False}])
def test_ddim_steps_any_timestep_as_diffusers(config):
    """A custom loop over timesteps the schedule does not hold (and one repeated)."""
    ours, ref = both("DDIMScheduler", **config)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    x, noise = tensors(2)
    x_ours = x_ref = x
    for t in [997, 955, 955, 610, 333, 41, 3]:
        x_ours = ours.step(fake_model(x_ours, t, noise), t, x_ours).prev_sample
        x_ref = ref.step(fake_model(x_ref, t, noise), torch.tensor(t), x_ref).prev_sample
        assert_close(x_ours, x_ref, f"DDIM at t={t}")


def test_ddpm_before_set_timesteps_steps_to_t_minus_one():
    ours, ref = both("DDPMScheduler")
    x, noise = tensors(3)
    for t in [999, 500, 17, 0]:
        a = ours.step(fake_model(x, t, noise), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ref.step(fake_model(x, t, noise), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert_close(a, b, f"DDPM at t={t}")
        assert ours.previous_timestep(t) == int(ref.previous_timestep(t))


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_step_prk_and_step_plms_match_diffusers(skip_prk_steps):
    """The public halves, called directly; timesteps shifted off the schedule by 3."""
    ours, ref = both("PNDMScheduler", skip_prk_steps=skip_prk_steps)
    ours.set_timesteps(15)
    ref.set_timesteps(15)
    x, noise = tensors(4)
    x_ours = x_ref = x
    prk = 0 if skip_prk_steps else len(ref.prk_timesteps)
    for i, t in enumerate(ref.timesteps.tolist()):
        t = max(t - 3, 0)
        method = "step_prk" if i < prk else "step_plms"
        out = getattr(ours, method)(fake_model(x_ours, t, noise), t, x_ours)
        x_ref = getattr(ref, method)(fake_model(x_ref, t, noise), t, x_ref).prev_sample
        assert_close(out.prev_sample, x_ref, f"{method} at call {i}")
        x_ours = out.prev_sample
    assert ours.counter == ref.counter
    tup = ours.step_plms(x_ours, 5, x_ours, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1


def test_pndm_plms_before_prk_is_an_input_error():
    pndm = ours_pkg.PNDMScheduler()
    pndm.set_timesteps(10)
    with pytest.raises(InputError, match="step_prk"):
        pndm.step_plms(torch.zeros(SHAPE), 901, torch.zeros(SHAPE))


# ---- trained_betas through save / load -----------------------------------------------------
@pytest.mark.parametrize("kind", ["ndarray", "list"])
@pytest.mark.parametrize("name", NAMES)
def test_trained_betas_survive_save_and_load(name, kind, tmp_path):
    betas = np.linspace(0.0001, 0.02, 1000) ** 1.1
    given = betas if kind == "ndarray" else betas.tolist()
    ours, ref = both(name, trained_betas=given)
    ours.save_config(tmp_path / "ours")
    ours.save_pretrained(tmp_path / "again")
    loaded = getattr(ours_pkg, name).from_pretrained(tmp_path / "ours")
    loaded_ref = getattr(diffusers, name).from_pretrained(tmp_path / "ours")  # diffusers reads our file
    assert loaded.config.trained_betas == pytest.approx(betas.tolist(), abs=0)
    assert_close(loaded.alphas_cumprod, ref.alphas_cumprod, "alphas_cumprod")
    assert_close(loaded_ref.alphas_cumprod, ref.alphas_cumprod, "diffusers from our file")
    switched = ours_pkg.EulerDiscreteScheduler.from_config(ours.config)
    switched_ref = diffusers.EulerDiscreteScheduler.from_config(ref.config)
    switched.set_timesteps(10)
    switched_ref.set_timesteps(10)
    assert_close(switched.sigmas, switched_ref.sigmas, "sigmas after switching")


# ---- register_to_config ----------------------------------------------------------------------
def test_register_to_config_method_merges_as_diffusers():
    ours, ref = both("DDIMScheduler")
    ours.register_to_config(steps_offset=1, my_note="kept")
    ref.register_to_config(steps_offset=1, my_note="kept")
    assert dict(ours.config) == {**dict(ref.config), "_use_default_values": ours.config["_use_default_values"]}
    assert sorted(ours.config["_use_default_values"]) == sorted(ref.config["_use_default_values"])
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps)  # set_timesteps reads the updated config


class MyDDIM(ours_pkg.DDIMScheduler):
    @register_to_config
    def __init__(self, my_scale: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.my_scale = my_scale


class MyDDIMRef(diffusers.DDIMScheduler):
    @diffusers.configuration_utils.register_to_config
    def __init__(self, my_scale: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.my_scale = my_scale


def _named(config: dict) -> dict:
    out = dict(config)
    out["_use_default_values"] = sorted(out.get("_use_default_values", ()))
    return out


def test_register_to_config_on_a_subclass_as_diffusers(tmp_path):
    ours, ref = MyDDIM(my_scale=3.0, clip_sample=False), MyDDIMRef(my_scale=3.0, clip_sample=False)
    assert _named(ours.config) == _named(ref.config)
    assert ours.my_scale == 3.0 and ours.config.clip_sample is False
    ours.save_config(tmp_path)
    again = MyDDIM.from_pretrained(tmp_path)
    assert again.config.my_scale == 3.0 and again.config.clip_sample is False
    plain = ours_pkg.EulerDiscreteScheduler.from_config(ours.config)
    plain_ref = diffusers.EulerDiscreteScheduler.from_config(ref.config)
    assert _named(plain.config) == _named(plain_ref.config)


# ---- DPM-Solver's algorithm types --------------------------------------------------------------
DPM_CASES = [
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3,
     "prediction_type": "v_prediction"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 1,
     "prediction_type": "sample", "thresholding": True},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun",
     "use_karras_sigmas": True},
    {"algorithm_type": "deis", "solver_type": "bh2", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver++", "solver_type": "logrho"},
]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("config", DPM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_dpmsolver_algorithm_types_match_diffusers(config, steps):
    ours, ref = both("DPMSolverMultistepScheduler", **config)
    assert _named(ours.config) == _named(ref.config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert_close(ours.sigmas, ref.sigmas, "sigmas")
    x, noise = tensors(6)
    x_ours = x_ref = x
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    for i, (t, t_ref) in enumerate(zip(ours.timesteps, ref.timesteps)):
        x_ours = ours.step(fake_model(x_ours, t, noise), t, x_ours, generator=gens[0]).prev_sample
        x_ref = ref.step(fake_model(x_ref, t_ref, noise), t_ref, x_ref, generator=gens[1]).prev_sample
        assert_close(x_ours, x_ref, f"prev_sample at step {i}")


@pytest.mark.parametrize("name,key,value,accepted", [
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpm++", "sde-dpmsolver"),
    ("DPMSolverMultistepScheduler", "solver_type", "rk4", "heun"),
    ("UniPCMultistepScheduler", "solver_type", "bh3", "bh2"),
    ("DDIMScheduler", "beta_schedule", "sigmoid", "squaredcos_cap_v2"),
    ("EulerDiscreteScheduler", "beta_schedule", "laplace", "scaled_linear"),
])
def test_values_diffusers_rejects_are_config_errors(name, key, value, accepted):
    with pytest.raises(Exception):
        getattr(diffusers, name)(**{key: value})
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r}") + ".*" + accepted):
        getattr(ours_pkg, name)(**{key: value})


@pytest.mark.parametrize("algorithm", ["dpmsolver", "sde-dpmsolver", "deis"])
def test_dpmsolver_zero_final_sigma_needs_a_data_prediction_algorithm(algorithm):
    with pytest.raises(ValueError):
        diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm)
    with pytest.raises(ConfigError, match=f"final_sigmas_type='zero'.*algorithm_type='{algorithm}'.*sigma_min"):
        ours_pkg.DPMSolverMultistepScheduler(algorithm_type=algorithm)


@pytest.mark.parametrize("name,schedule", [("DDPMScheduler", "sigmoid"), ("DDPMScheduler", "laplace"),
                                           ("HeunDiscreteScheduler", "exp")])
def test_beta_schedules_only_some_schedulers_take(name, schedule):
    ours, ref = both(name, beta_schedule=schedule)
    assert_close(ours.alphas_cumprod, ref.alphas_cumprod, f"{name} {schedule}")
