"""Scheduler parity with diffusers 0.42.1: schedules, whole trajectories, add_noise, configs.

A deterministic fake model (0.1 * x + sin(t / 100) * fixed noise) drives our scheduler and
diffusers' from the same start; stochastic samplers get generators with the same seed.
Tolerance: fp32, max-abs 1e-6 scaled by the sample's magnitude (sigma-space samples reach ~15,
where one fp32 ulp is already ~1e-6).
"""
from __future__ import annotations

import math

import diffusers
import pytest
import torch

import runtime.schedulers as ours_pkg
from runtime.models.errors import ConfigError, InputError

ATOL = 1e-6
SHAPE = (1, 4, 8, 8)
META = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}

# (class name, config overrides, step kwargs): every option the runtime promises to match.
CASES = [
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, {}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                       "prediction_type": "v_prediction"}, {}),
    ("DDIMScheduler", {"steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False}, {}),
    ("DDIMScheduler", {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5}, {}),
    ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2"}, {"eta": 1.0, "use_clipped_model_output": True}),
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                       "prediction_type": "v_prediction", "variance_type": "fixed_large"}, {}),
    ("DDPMScheduler", {"timestep_spacing": "linspace", "prediction_type": "sample", "clip_sample": False,
                       "variance_type": "fixed_small_log"}, {}),
    ("PNDMScheduler", {}, {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ("PNDMScheduler", {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}, {}),
    ("PNDMScheduler", {"timestep_spacing": "trailing", "skip_prk_steps": True, "set_alpha_to_one": True}, {}),
    ("LMSDiscreteScheduler", {}, {}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}),
    ("LMSDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "sample"}, {}),
    ("LMSDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1,
                                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                                "prediction_type": "v_prediction"}, {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, {}),
    ("EulerDiscreteScheduler", {"prediction_type": "sample", "interpolation_type": "log_linear"}, {}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "sigma_min": 0.05}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, {}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                                         "prediction_type": "v_prediction"}, {}),
    ("HeunDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, {}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "sample",
                               "clip_sample": True, "clip_sample_range": 2.0}, {}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "beta_schedule": "scaled_linear",
                                     "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
                                     "solver_type": "heun"}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "prediction_type": "v_prediction"}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "lower_order_final": False,
                                     "final_sigmas_type": "sigma_min"}, {}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "solver_type": "heun", "prediction_type": "sample",
                                     "timestep_spacing": "leading", "steps_offset": 1}, {}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                                     "prediction_type": "v_prediction", "final_sigmas_type": "zero"}, {}),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True, "thresholding": True}, {}),
    ("UniPCMultistepScheduler", {}, {}),
    # bh1 and the noise-prediction form divide by a zero final sigma (NaN in diffusers too): sigma_min
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "prediction_type": "v_prediction",
                                 "final_sigmas_type": "sigma_min"}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "use_karras_sigmas": True,
                                 "final_sigmas_type": "sigma_min"}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 1, "timestep_spacing": "leading", "steps_offset": 1}, {}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "timestep_spacing": "trailing", "disable_corrector": [0],
                                 "prediction_type": "sample", "lower_order_final": False,
                                 "final_sigmas_type": "sigma_min"}, {}),
    ("LCMScheduler", {}, {}),
    ("LCMScheduler", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "clip_sample": True}, {}),
]


def both(name: str, **config):
    return getattr(ours_pkg, name)(**config), getattr(diffusers, name)(**config)


def fake_model(x: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    return 0.1 * x + math.sin(float(t) / 100.0) * noise


# diffusers integrates LMS coefficients with scipy quad over an fp32 integrand (~1e-7 relative
# error, measured); ours integrates the polynomials exactly, so LMS gets a few ulps more.
TOL_FACTOR = {"LMSDiscreteScheduler": 4.0}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, factor: float = 1.0) -> None:
    scale = max(1.0, b.abs().max().item()) * factor
    err = (a.double() - b.double()).abs().max().item()
    assert err <= ATOL * scale, f"{what}: max-abs error {err:.3g} > {ATOL * scale:.3g}"


def run(sched, timesteps, x, noise, step_kwargs, seed=None):
    """Denoise with ``sched`` over ``timesteps``; returns the per-step (model input, prev_sample)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    extra = dict(step_kwargs)
    if gen is not None:
        extra["generator"] = gen
    trace = []
    for t in timesteps:
        x_in = sched.scale_model_input(x, t)
        x = sched.step(fake_model(x_in, t, noise), t, x, **extra).prev_sample
        trace.append((x_in, x))
    return trace


STOCHASTIC = {"EulerAncestralDiscreteScheduler", "DDPMScheduler", "LCMScheduler"}


def needs_generator(name, config, step_kwargs) -> bool:
    return (name in STOCHASTIC or config.get("algorithm_type") == "sde-dpmsolver++"
            or step_kwargs.get("eta", 0) > 0 or step_kwargs.get("s_churn", 0) > 0)


def case_id(case):
    name, config, kw = case
    return name.replace("Scheduler", "") + "-" + ",".join(f"{k}={v}" for k, v in {**config, **kw}.items())


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_schedule_and_trajectory_match_diffusers(case, steps):
    name, config, step_kwargs = case
    ours, ref = both(name, **config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert_close(ours.timesteps, ref.timesteps, "timesteps")
    if hasattr(ref, "sigmas"):
        assert_close(ours.sigmas, ref.sigmas, "sigmas")
    init_sigma = torch.as_tensor(ours.init_noise_sigma)
    assert_close(init_sigma, torch.as_tensor(ref.init_noise_sigma), "init_noise_sigma")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g) * init_sigma
    noise = torch.randn(SHAPE, generator=g)
    seed = 123 if needs_generator(name, config, step_kwargs) else None
    mine = run(ours, ours.timesteps, x0, noise, step_kwargs, seed)
    theirs = run(ref, ref.timesteps, x0, noise, step_kwargs, seed)
    factor = TOL_FACTOR.get(name, 1.0)
    for i, ((a_in, a), (b_in, b)) in enumerate(zip(mine, theirs)):
        assert_close(a_in, b_in, f"scale_model_input at step {i}", factor)
        assert_close(a, b, f"prev_sample at step {i}", factor)


def test_step_outputs_and_tuple_form():
    for name, field in [("DDIMScheduler", "pred_original_sample"), ("EulerDiscreteScheduler", "pred_original_sample"),
                        ("LCMScheduler", "denoised")]:
        ours, ref = both(name)
        ours.set_timesteps(4)
        ref.set_timesteps(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        t = ours.timesteps[0]
        out = ours.step(0.3 * x, t, x, generator=torch.Generator().manual_seed(2))
        expected = ref.step(0.3 * x, ref.timesteps[0], x, generator=torch.Generator().manual_seed(2))
        assert_close(getattr(out, field), getattr(expected, field), f"{name}.{field}")
        ours.set_timesteps(4)
        tup = ours.step(0.3 * x, t, x, generator=torch.Generator().manual_seed(2), return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 2
        assert_close(tup[0], expected.prev_sample, f"{name} tuple")


IMG2IMG = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
           "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
           "UniPCMultistepScheduler", "LCMScheduler"]


@pytest.mark.parametrize("name", IMG2IMG)
def test_img2img_partial_schedule(name):
    """As diffusers' img2img: noise the image to timesteps[start], set_begin_index, run the rest."""
    steps = 4 if name == "LCMScheduler" else 20
    ours, ref = both(name)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    start = (steps // 2 if name != "PNDMScheduler" else 13) * ref.order
    if hasattr(ref, "set_begin_index"):
        ours.set_begin_index(start)
        ref.set_begin_index(start)
    g = torch.Generator().manual_seed(5)
    image, noise, model_noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    t0 = ours.timesteps[start:start + 1]
    x_ours = ours.add_noise(image, noise, t0)
    x_ref = ref.add_noise(image, noise, ref.timesteps[start:start + 1])
    assert_close(x_ours, x_ref, "add_noise at the start timestep")
    seed = 7 if needs_generator(name, {}, {}) else None
    gens = [torch.Generator().manual_seed(seed) if seed is not None else None for _ in range(2)]
    count = 0
    for i, (t_ours, t_ref) in enumerate(zip(ours.timesteps[start:], ref.timesteps[start:])):
        kw = [{"generator": g} if g is not None else {} for g in gens]
        x_ours = ours.step(fake_model(ours.scale_model_input(x_ours, t_ours), t_ours, model_noise), t_ours, x_ours,
                           **kw[0]).prev_sample
        x_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t_ref), t_ref, model_noise), t_ref, x_ref,
                         **kw[1]).prev_sample
        assert_close(x_ours, x_ref, f"prev_sample at step {start + i}", TOL_FACTOR.get(name, 1.0))
        following = slice(start + i + 1, start + i + 2)  # inpainting re-noises the kept image per step
        if following.start < len(ref.timesteps):
            assert_close(ours.add_noise(image, noise, ours.timesteps[following]),
                  ref.add_noise(image, noise, ref.timesteps[following]), f"add_noise after step {start + i}")
        count += 1
    assert count == len(ref.timesteps) - start


@pytest.mark.parametrize("name", sorted(ours_pkg.SCHEDULER_CLASSES))
def test_add_noise_batch_matches_diffusers(name):
    ours, ref = both(name)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(3)
    original, noise = torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 4, 8, 8), generator=g)
    picks = [0, 3, 7]
    assert_close(ours.add_noise(original, noise, ours.timesteps[picks]),
          ref.add_noise(original, noise, ref.timesteps[picks]), "add_noise")


@pytest.mark.parametrize("name", sorted(ours_pkg.SCHEDULER_CLASSES))
def test_config_keys_defaults_and_interchange(name, tmp_path):
    ours, ref = both(name)
    strip = lambda c: {k: v for k, v in c.items() if k not in META}  # noqa: E731
    assert strip(ours.config) == strip(ref.config)
    # diffusers' config into ours, ours into diffusers; other schedulers' configs too
    assert strip(getattr(ours_pkg, name).from_config(ref.config).config) == strip(ref.config)
    assert strip(type(ref).from_config(ours.config).config) == strip(ref.config)
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction", steps_offset=1)
    switched, switched_ref = getattr(ours_pkg, name).from_config(ddim.config), type(ref).from_config(ddim.config)
    assert strip(switched.config) == strip(switched_ref.config)
    # save -> load in both directions through scheduler_config.json
    ours.save_pretrained(tmp_path / "ours" / "scheduler")
    assert strip(type(ref).from_pretrained(tmp_path / "ours", subfolder="scheduler").config) == strip(ref.config)
    reloaded = getattr(ours_pkg, name).from_pretrained(tmp_path / "ours", subfolder="scheduler")
    assert strip(reloaded.config) == strip(ours.config)
    switched_ref.save_pretrained(tmp_path / "ref")
    assert strip(getattr(ours_pkg, name).from_pretrained(tmp_path / "ref").config) == strip(switched_ref.config)


def test_from_config_takes_another_schedulers_config():
    euler = ours_pkg.EulerDiscreteScheduler.from_config(ours_pkg.DDIMScheduler(beta_schedule="scaled_linear").config)
    assert euler.config.beta_schedule == "scaled_linear" and "clip_sample" not in euler.config
    dpm = ours_pkg.DPMSolverMultistepScheduler.from_config(euler.config, use_karras_sigmas=True)
    assert dpm.config.use_karras_sigmas is True
    assert type(ours_pkg.DDIMScheduler().compatibles[0]) is type


@pytest.mark.parametrize("name", sorted(ours_pkg.SCHEDULER_CLASSES))
def test_fresh_copy_is_independent(name):
    base = getattr(ours_pkg, name)()
    base.set_timesteps(10)
    g = torch.Generator().manual_seed(9)
    x, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    seed = 4 if needs_generator(name, {}, {}) else None
    first = base.fresh_copy()
    a = run(first, first.timesteps, x, noise, {}, seed)
    second = base.fresh_copy()  # the original is untouched by the first run
    b = run(second, second.timesteps, x, noise, {}, seed)
    assert torch.equal(a[-1][1], b[-1][1])
    assert base.step_index is None
    # a copy taken mid-run carries the run's state and then diverges from it independently
    mid = base.fresh_copy()
    head = run(mid, mid.timesteps[:3], x, noise, {}, seed)
    fork = mid.fresh_copy()
    gen_state = None if seed is None else 5
    tail_a = run(mid, mid.timesteps[3:], head[-1][1], noise, {}, gen_state)
    tail_b = run(fork, fork.timesteps[3:], head[-1][1], noise, {}, gen_state)
    assert torch.equal(tail_a[-1][1], tail_b[-1][1])


@pytest.mark.parametrize("name", sorted(ours_pkg.SCHEDULER_CLASSES))
def test_bad_step_counts_raise_input_error(name):
    sched = getattr(ours_pkg, name)()
    for bad in (0, -3, 2.5):
        with pytest.raises(InputError, match=str(bad)):
            sched.set_timesteps(bad)
    with pytest.raises(InputError, match="1001"):
        sched.set_timesteps(1001)


@pytest.mark.parametrize("name", sorted(ours_pkg.SCHEDULER_CLASSES))
@pytest.mark.parametrize("key,value", [("prediction_type", "velocity"), ("beta_schedule", "cubic")])
def test_unknown_config_values_raise_config_error(name, key, value):
    with pytest.raises(ConfigError, match=f"{key}.*{value}"):
        getattr(ours_pkg, name)(**{key: value})


@pytest.mark.parametrize("name", [n for n in sorted(ours_pkg.SCHEDULER_CLASSES) if n != "LCMScheduler"])
def test_unknown_timestep_spacing_raises_config_error(name):
    with pytest.raises(ConfigError, match="timestep_spacing.*middle"):
        getattr(ours_pkg, name)(timestep_spacing="middle")


def test_step_before_set_timesteps_is_an_input_error():
    sched = ours_pkg.DDIMScheduler()
    with pytest.raises(InputError, match="set_timesteps"):
        sched.step(torch.zeros(SHAPE), 10, torch.zeros(SHAPE))


CUSTOM = [
    ("DDPMScheduler", {}, {"timesteps": [999, 800, 600, 400, 200, 0]}),
    ("EulerDiscreteScheduler", {}, {"timesteps": [999.0, 700.0, 500.0, 300.0, 100.0, 10.0]}),
    ("EulerDiscreteScheduler", {}, {"sigmas": [14.0, 7.0, 3.0, 1.0, 0.3, 0.0]}),
    ("HeunDiscreteScheduler", {}, {"timesteps": [999.0, 600.0, 300.0, 50.0]}),
    ("DPMSolverMultistepScheduler", {}, {"timesteps": [999, 700, 500, 300, 100, 10]}),
    ("LCMScheduler", {}, {"timesteps": [999, 759, 499, 259]}),
]


@pytest.mark.parametrize("case", CUSTOM, ids=case_id)
def test_custom_timesteps_and_sigmas_match_diffusers(case):
    name, config, schedule = case
    ours, ref = both(name, **config)
    ours.set_timesteps(**schedule)
    ref.set_timesteps(**schedule)
    assert_close(ours.timesteps, ref.timesteps, "timesteps")
    if hasattr(ref, "sigmas"):
        assert_close(ours.sigmas, ref.sigmas, "sigmas")
    g = torch.Generator().manual_seed(11)
    x, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    seed = 8 if needs_generator(name, config, {}) else None
    mine, theirs = run(ours, ours.timesteps, x, noise, {}, seed), run(ref, ref.timesteps, x, noise, {}, seed)
    for i, ((_, a), (_, b)) in enumerate(zip(mine, theirs)):
        assert_close(a, b, f"prev_sample at step {i}")


def test_switching_class_keeps_only_explicit_keys(tmp_path):
    """As diffusers: keys the source config only defaulted take the new class's defaults."""
    assert ours_pkg.EulerDiscreteScheduler.from_config(ours_pkg.DDIMScheduler().config).config.timestep_spacing \
        == "linspace"
    explicit = ours_pkg.DDIMScheduler(timestep_spacing="leading")
    assert ours_pkg.EulerDiscreteScheduler.from_config(explicit.config).config.timestep_spacing == "leading"
    # a JSON without timestep_spacing (Stable Diffusion 1.x's PNDM config) switched to Euler
    (tmp_path / "scheduler_config.json").write_text('{"_class_name": "PNDMScheduler", "beta_schedule": '
                                                     '"scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, '
                                                     '"skip_prk_steps": true, "steps_offset": 1}')
    pndm, pndm_ref = ours_pkg.PNDMScheduler.from_pretrained(tmp_path), diffusers.PNDMScheduler.from_pretrained(tmp_path)
    euler = ours_pkg.EulerDiscreteScheduler.from_config(pndm.config)
    euler_ref = diffusers.EulerDiscreteScheduler.from_config(pndm_ref.config)
    euler.set_timesteps(20)
    euler_ref.set_timesteps(20)
    assert_close(euler.timesteps, euler_ref.timesteps, "timesteps after switching")
    assert_close(euler.sigmas, euler_ref.sigmas, "sigmas after switching")
    assert "_use_default_values" not in (tmp_path / "scheduler_config.json").read_text()
    euler.save_pretrained(tmp_path / "euler")
    assert "_use_default_values" not in (tmp_path / "euler" / "scheduler_config.json").read_text()


# DDIM, DDPM and PNDM step from the timestep passed (diffusers keeps no step index for them)
STEP_INDEXED = sorted(set(ours_pkg.SCHEDULER_CLASSES) - {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler"})


@pytest.mark.parametrize("name", STEP_INDEXED)
def test_step_past_the_end_is_an_input_error(name):
    sched = getattr(ours_pkg, name)()
    sched.set_timesteps(4)
    x = torch.zeros(SHAPE)
    gen = torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        x = sched.step(0.1 * sched.scale_model_input(x, t), t, x, generator=gen).prev_sample
    with pytest.raises(InputError, match="set_timesteps"):
        sched.step(x, sched.timesteps[-1], x, generator=gen)
