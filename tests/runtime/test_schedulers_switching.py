"""Scheduler switching (``Other.from_config(s.config)``) against diffusers 0.42.1.

Every one of the ten schedulers is built from every other one's config, and from the
scheduler_config.json of an SD 1.x, SD 2.x and SDXL folder; the resulting configs must equal
diffusers' exactly, and the schedules and a short run of ``step`` outputs must match.
"""
from __future__ import annotations

import inspect
import json
import math

import diffusers
import pytest
import torch

import runtime.schedulers as ours_pkg

NAMES = sorted(ours_pkg.SCHEDULER_CLASSES)
SHAPE = (1, 4, 8, 8)

# The scheduler_config.json files these folders ship (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0).
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
FOLDERS = {"sd1": SD1_SCHEDULER, "sd2": SD2_SCHEDULER, "sdxl": SDXL_SCHEDULER}


def comparable(config) -> dict:
    """The config as a plain dict; ``_use_default_values`` (a set in diffusers) sorted."""
    out = dict(config)
    if "_use_default_values" in out:
        out["_use_default_values"] = sorted(out["_use_default_values"])
    return out


def load_both(name: str, config: dict, tmp_path):
    """``name`` loaded from a folder holding ``config``, by us and by diffusers."""
    folder = tmp_path / f"{name}-src"
    folder.mkdir(exist_ok=True)
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": name}))
    return (getattr(ours_pkg, name).from_pretrained(folder), getattr(diffusers, name).from_pretrained(folder))


def fake_model(x, t, noise):
    return 0.1 * x + math.sin(float(t) / 100.0) * noise


def assert_close(a, b, what):
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 1e-6 * scale * 4, f"{what}: max-abs error {err:.3g}"


def assert_same_run(ours, ref, steps: int = 10, n_steps: int | None = None):
    """Same timesteps, sigmas, and step outputs for the first ``n_steps`` steps (all by default)."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.allclose(ours.timesteps.double(), ref.timesteps.double(), atol=1e-4, rtol=0), "timesteps"
    if hasattr(ref, "sigmas"):
        assert_close(ours.sigmas, ref.sigmas, "sigmas")
    g = torch.Generator().manual_seed(0)
    init = float(torch.as_tensor(ref.init_noise_sigma))
    x_ours = x_ref = torch.randn(SHAPE, generator=g) * init
    noise = torch.randn(SHAPE, generator=g)
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)]
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    kw = [{"generator": g} if takes_generator else {} for g in gens]
    pairs = list(zip(ours.timesteps, ref.timesteps))[:n_steps]
    for i, (t_ours, t_ref) in enumerate(pairs):
        out_ours = ours.step(fake_model(ours.scale_model_input(x_ours, t_ours), t_ours, noise), t_ours, x_ours, **kw[0])
        out_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t_ref), t_ref, noise), t_ref, x_ref, **kw[1])
        x_ours, x_ref = out_ours.prev_sample, out_ref.prev_sample
        assert_close(x_ours, x_ref, f"prev_sample at step {i}")


def test_sd1_pndm_folder_switched_to_ddim_keeps_clip_sample_false(tmp_path):
    """The issue's case: DDIM from an SD 1.x PNDM config must not clip (diffusers does not)."""
    pndm, pndm_ref = load_both("PNDMScheduler", SD1_SCHEDULER, tmp_path)
    ddim = ours_pkg.DDIMScheduler.from_config(pndm.config)
    ddim_ref = diffusers.DDIMScheduler.from_config(pndm_ref.config)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    assert "clip_sample" not in ddim.config["_use_default_values"]
    assert comparable(ddim.config) == comparable(ddim_ref.config)
    assert_same_run(ddim, ddim_ref, steps=20)


@pytest.mark.parametrize("folder", sorted(FOLDERS))
@pytest.mark.parametrize("target", NAMES)
def test_switching_from_a_folder_config_matches_diffusers(folder, target, tmp_path):
    source = FOLDERS[folder]["_class_name"]
    loaded, loaded_ref = load_both(source, FOLDERS[folder], tmp_path)
    assert comparable(loaded.config) == comparable(loaded_ref.config)
    ours = getattr(ours_pkg, target).from_config(loaded.config)
    ref = getattr(diffusers, target).from_config(loaded_ref.config)
    assert comparable(ours.config) == comparable(ref.config)
    # diffusers' config into ours gives the same
    assert comparable(getattr(ours_pkg, target).from_config(loaded_ref.config).config) == comparable(ref.config)
    assert_same_run(ours, ref)


@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("source", NAMES)
def test_every_scheduler_from_every_other_ones_config(source, target, tmp_path):
    """Source built from an SD 1.x-like folder that names ``source``; then switched to ``target``
    and on to a third class (hidden keys must keep travelling)."""
    loaded, loaded_ref = load_both(source, SD1_SCHEDULER, tmp_path)
    assert comparable(loaded.config) == comparable(loaded_ref.config)
    ours = getattr(ours_pkg, target).from_config(loaded.config)
    ref = getattr(diffusers, target).from_config(loaded_ref.config)
    assert comparable(ours.config) == comparable(ref.config)
    assert_same_run(ours, ref, steps=10, n_steps=4)
    onward = "DDIMScheduler" if target != "DDIMScheduler" else "EulerDiscreteScheduler"
    assert comparable(getattr(ours_pkg, onward).from_config(ours.config).config) \
        == comparable(getattr(diffusers, onward).from_config(ref.config).config)


@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("source", NAMES)
def test_switching_from_a_constructed_scheduler(source, target):
    """Explicit constructor arguments carry over; defaulted ones take the target's defaults."""
    kwargs = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
              "timestep_spacing": "trailing"}
    ours = getattr(ours_pkg, target).from_config(getattr(ours_pkg, source)(**kwargs).config)
    ref = getattr(diffusers, target).from_config(getattr(diffusers, source)(**kwargs).config)
    assert comparable(ours.config) == comparable(ref.config)
    assert_same_run(ours, ref, steps=8, n_steps=3)


def test_from_config_overrides_and_unused_kwargs_match_diffusers(tmp_path):
    pndm, pndm_ref = load_both("PNDMScheduler", SD1_SCHEDULER, tmp_path)
    ours, unused = ours_pkg.EulerDiscreteScheduler.from_config(pndm.config, return_unused_kwargs=True,
                                                               use_karras_sigmas=True, not_a_key=3)
    ref, unused_ref = diffusers.EulerDiscreteScheduler.from_config(pndm_ref.config, return_unused_kwargs=True,
                                                                   use_karras_sigmas=True, not_a_key=3)
    assert comparable(ours.config) == comparable(ref.config)
    assert comparable(unused) == comparable(unused_ref)
    # from_pretrained takes the same overrides
    folder = tmp_path / "PNDMScheduler-src"
    assert comparable(ours_pkg.DDIMScheduler.from_pretrained(folder, clip_sample=True).config) \
        == comparable(diffusers.DDIMScheduler.from_pretrained(folder, clip_sample=True).config)


def test_saved_switched_config_round_trips(tmp_path):
    """Hidden keys are written (as diffusers writes them); _use_default_values is not."""
    pndm, pndm_ref = load_both("PNDMScheduler", SD1_SCHEDULER, tmp_path)
    ddim, ddim_ref = ours_pkg.DDIMScheduler.from_config(pndm.config), diffusers.DDIMScheduler.from_config(pndm_ref.config)
    ddim.save_config(tmp_path / "ours")
    ddim_ref.save_config(tmp_path / "ref")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert written == json.loads((tmp_path / "ref" / "scheduler_config.json").read_text())
    assert "_use_default_values" not in written and written["skip_prk_steps"] is True
    again = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "ours")
    assert comparable(ours_pkg.EulerDiscreteScheduler.from_pretrained(tmp_path / "ours").config) \
        == comparable(again.config)
