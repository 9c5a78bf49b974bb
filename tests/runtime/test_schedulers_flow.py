"""Flow-matching schedules of UniPC and DPM-Solver against diffusers 0.42.1.

``use_flow_sigmas`` swaps the VP path for x_t = (1 - sigma) x0 + sigma noise with sigmas
1 - t/T shifted by ``flow_shift`` (or by ``mu`` with ``use_dynamic_shifting``), and
``prediction_type="flow_prediction"`` reads the model output as the velocity noise - x0.
Timesteps and sigmas must be equal; trajectories (a fixed random model output mixed with the
sample) within fp32 rounding.
"""
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

ATOL = 1e-6
SHAPE = (2, 4, 8, 8)
U, D = "UniPCMultistepScheduler", "DPMSolverMultistepScheduler"
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

# (class, config, set_timesteps kwargs)
CASES = [
    (U, FLOW, {}),
    (U, {**FLOW, "flow_shift": 3.0}, {}),
    (U, {**FLOW, "flow_shift": 5.0, "solver_order": 3}, {}),
    # bh1 divides by a zero final sigma (NaN in diffusers too): sigma_min
    (U, {**FLOW, "flow_shift": 3.0, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {}),
    (U, {**FLOW, "flow_shift": 3.0, "final_sigmas_type": "sigma_min"}, {}),
    (U, {**FLOW, "flow_shift": 2.0, "shift_terminal": 0.1}, {}),
    (U, {**FLOW, "flow_shift": 3.0, "disable_corrector": [0, 1]}, {}),
    (U, {**FLOW, "flow_shift": 3.0, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, {}),
    (U, {**FLOW, "flow_shift": 3.0, "thresholding": True, "sample_max_value": 1.2}, {}),
    (U, {**FLOW, "use_dynamic_shifting": True}, {"mu": 0.8}),
    (U, {**FLOW, "use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.5}),
    (U, {**FLOW, "use_karras_sigmas": True}, {}),
    (U, {**FLOW, "flow_shift": 3.0}, {"sigmas": [1.0, 0.9, 0.7, 0.45, 0.2, 0.05]}),
    (U, {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "v_prediction"}, {}),
    (U, {"prediction_type": "flow_prediction"}, {}),  # velocity read on the VP schedule, as diffusers does
    (D, FLOW, {}),
    (D, {**FLOW, "flow_shift": 3.0}, {}),
    (D, {**FLOW, "flow_shift": 5.0, "solver_order": 3}, {}),
    (D, {**FLOW, "flow_shift": 3.0, "solver_type": "heun"}, {}),
    (D, {**FLOW, "flow_shift": 3.0, "final_sigmas_type": "sigma_min"}, {}),
    (D, {**FLOW, "flow_shift": 3.0, "euler_at_final": True, "lower_order_final": False}, {}),
    (D, {**FLOW, "flow_shift": 3.0, "algorithm_type": "sde-dpmsolver++"}, {}),
    (D, {**FLOW, "use_dynamic_shifting": True}, {"mu": 0.8}),
    (D, {"use_flow_sigmas": True, "flow_shift": 3.0, "algorithm_type": "dpmsolver",
         "final_sigmas_type": "sigma_min"}, {}),
    (D, {"prediction_type": "flow_prediction"}, {}),
]


def case_id(case):
    name, config, kw = case
    return name[:5] + "-" + ",".join(f"{k}={v}" for k, v in {**config, **kw}.items())


def assert_close(a, b, what):
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    assert err <= ATOL * scale, f"{what}: max-abs error {err:.3g} > {ATOL * scale:.3g}"


def trajectory(sched, x, model_out, seed):
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    if type(sched).__name__ == U:
        kw = {}  # diffusers' UniPC step takes no generator
    out = []
    for t in sched.timesteps:
        v = 0.5 * model_out + 0.1 * x  # a fixed random "velocity" that still depends on the sample
        x = sched.step(v, t, x, **kw).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flow_schedule_and_trajectory_match_diffusers(case, steps):
    name, config, set_kw = case
    ours, ref = getattr(ours_pkg, name)(**config), getattr(diffusers, name)(**config)
    n = None if "sigmas" in set_kw else steps
    ours.set_timesteps(n, **set_kw)
    ref.set_timesteps(n, **{k: np.array(v) if k == "sigmas" else v for k, v in set_kw.items()})
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    model_out = torch.randn(SHAPE, generator=g)
    for i, (a, b) in enumerate(zip(trajectory(ours, x, model_out, 7), trajectory(ref, x, model_out, 7))):
        assert torch.isfinite(b).all()
        assert_close(a, b, f"prev_sample at step {i}")


# diffusers takes these but keeps VP sigmas (> 1) under the flow formulas, so its samples turn NaN;
# the schedules must still be the same.
@pytest.mark.parametrize("name,config", [
    (U, {**FLOW, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}),
    (U, {**FLOW, "use_beta_sigmas": True}),
    (D, {**FLOW, "use_karras_sigmas": True}),
    (D, {**FLOW, "use_lu_lambdas": True}),
])
def test_flow_with_vp_respacing_gives_diffusers_schedule(name, config):
    ours, ref = getattr(ours_pkg, name)(**config), getattr(diffusers, name)(**config)
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_close(ours.sigmas, ref.sigmas, "sigmas")


@pytest.mark.parametrize("name", [U, D])
def test_flow_add_noise_matches_diffusers(name):
    ours, ref = (getattr(m, name)(**FLOW, flow_shift=3.0) for m in (ours_pkg, diffusers))
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = ref.timesteps[[2, 5]]
    assert_close(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), "add_noise")


def test_dpmsolver_mu_sets_the_flow_shift_for_later_schedules_too():
    ours, ref = (m.DPMSolverMultistepScheduler(**FLOW, use_dynamic_shifting=True) for m in (ours_pkg, diffusers))
    ours.set_timesteps(8, mu=0.7)
    ref.set_timesteps(8, mu=0.7)
    assert math.isclose(ours.flow_shift, math.exp(0.7))
    ours.set_timesteps(8)
    ref.set_timesteps(8)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


def test_flow_config_round_trips_and_switches(tmp_path):
    ours = ours_pkg.UniPCMultistepScheduler(**FLOW, flow_shift=3.0)
    ours.save_config(tmp_path)
    back = ours_pkg.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert back.config.use_flow_sigmas and back.config.flow_shift == 3.0
    ref = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    other = ours_pkg.DPMSolverMultistepScheduler.from_config(back.config)
    other_ref = diffusers.DPMSolverMultistepScheduler.from_config(ref.config)
    for a, b in ((back, ref), (other, other_ref)):
        a.set_timesteps(9)
        b.set_timesteps(9)
        assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)


# What diffusers refuses in these modes, refused here with an error naming the argument.
@pytest.mark.parametrize("name,config,set_kw,error,pattern", [
    (U, {"shift_terminal": 0.1}, None, ConfigError, "shift_terminal=0.1 needs use_flow_sigmas=True"),
    (U, {"use_flow_sigmas": True, "use_dynamic_shifting": True}, {"num_inference_steps": 5}, InputError, "needs mu"),
    (U, {}, {"sigmas": [1.0, 0.5]}, InputError, "sigmas need use_flow_sigmas=True"),
    (U, {**FLOW, "predict_x0": False}, "step", ConfigError, "flow_prediction' needs predict_x0=True"),
    (D, {**FLOW, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "step", ConfigError,
     "flow_prediction' needs algorithm_type"),
    (D, FLOW, {"num_inference_steps": 5, "mu": 0.5}, InputError, "mu needs use_dynamic_shifting=True"),
    (D, {**FLOW, "use_dynamic_shifting": True, "time_shift_type": "linear"}, {"num_inference_steps": 5, "mu": 0.5},
     InputError, "time_shift_type='exponential'"),
])
def test_flow_misuse_is_refused_as_diffusers_refuses_it(name, config, set_kw, error, pattern):
    def use(module):
        sched = getattr(module, name)(**config)
        if set_kw == "step":
            sched.set_timesteps(4)
            x = torch.zeros(SHAPE)
            sched.step(x, sched.timesteps[0], x)
        elif set_kw is not None:
            sched.set_timesteps(**set_kw)

    with pytest.raises((ValueError, AssertionError)):
        use(diffusers)
    with pytest.raises(error, match=re.escape(pattern)):
        use(ours_pkg)


@pytest.mark.parametrize("name", [U, D])
def test_unknown_time_shift_type_is_a_config_error(name):
    with pytest.raises(ConfigError, match="time_shift_type='cubic'"):
        getattr(ours_pkg, name)(time_shift_type="cubic")
