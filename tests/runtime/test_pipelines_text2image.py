"""Text-to-image parity: our pipeline vs diffusers' on the same tiny random checkpoint folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, TOL, generator

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULERS = [
    ("DDIMScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # DPM++ 2M Karras
    ("UniPCMultistepScheduler", {}),
]
STEPS = 4


@pytest.fixture(scope="module")
def pipes(sd_folder):
    import diffusers

    ours = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    ours.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def with_scheduler(ours, ref, name, options):
    import diffusers

    mine = runtime.StableDiffusionPipeline.from_pipe(
        ours, scheduler=runtime.SCHEDULER_CLASSES[name].from_config(ours.scheduler.config, **options))
    theirs = diffusers.StableDiffusionPipeline.from_pipe(
        ref, scheduler=getattr(diffusers, name).from_config(ref.scheduler.config, **options))
    mine.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    return mine, theirs


def both(ours, ref, **kwargs):
    """Run both with fresh, equally seeded generators; returns (ours, theirs) outputs."""
    seed = kwargs.pop("seed", 0)
    count = kwargs.pop("n_generators", None)
    out = []
    for pipe in (ours, ref):
        gen = [generator(seed + i) for i in range(count)] if count else generator(seed)
        out.append(pipe(generator=gen, **kwargs).images)
    return out


def max_diff(a, b) -> float:
    a = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
    b = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b))
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name,options", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("guidance", [1.0, 6.0], ids=["no_cfg", "cfg"])
def test_latents_and_images_match_diffusers(pipes, name, options, guidance):
    mine, theirs = with_scheduler(*pipes, name, options)
    a, b = both(mine, theirs, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent")
    assert max_diff(a, b) <= TOL
    a, b = both(mine, theirs, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np")
    assert max_diff(a, b) <= TOL


def test_negative_prompt_and_two_images_per_prompt(pipes):
    ours, ref = pipes
    kwargs = dict(prompt=[PROMPT, "blue"], negative_prompt=["red", "circle"], num_images_per_prompt=2,
                  num_inference_steps=3, guidance_scale=5.0, output_type="np")
    a, b = both(ours, ref, **kwargs)
    assert a.shape == (4, 16, 16, 3)
    assert max_diff(a, b) <= TOL
    # the negative prompt changes the result (it is really used)
    c = ours(generator=generator(), **{**kwargs, "negative_prompt": None}).images
    assert max_diff(a, c) > 1e-3


def test_generator_list_gives_per_image_noise(pipes):
    ours, ref = pipes
    a, b = both(ours, ref, prompt=PROMPT, num_images_per_prompt=2, n_generators=2, num_inference_steps=2,
                output_type="latent")
    assert max_diff(a, b) <= TOL
    single = ours(PROMPT, num_inference_steps=2, generator=generator(1), output_type="latent").images
    assert max_diff(a[1:], single) <= TOL  # image 1 came from generator(seed + 1) alone


def test_prompt_embeds_latents_and_pil_output(pipes):
    ours, ref = pipes
    embeds = torch.randn(1, 77, 32, generator=generator(3))
    neg = torch.randn(1, 77, 32, generator=generator(4))
    latents = torch.randn(1, 4, 8, 8, generator=generator(5))
    a, b = both(ours, ref, prompt_embeds=embeds, negative_prompt_embeds=neg, latents=latents,
                num_inference_steps=2, output_type="pil")
    assert len(a) == 1 and a[0].size == (16, 16)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_height_width_and_pt_output(pipes):
    ours, ref = pipes
    a, b = both(ours, ref, prompt=PROMPT, height=16, width=24, num_inference_steps=2, output_type="pt")
    assert a.shape == (1, 3, 16, 24)
    assert max_diff(a, b) <= TOL


def test_guidance_rescale_matches(pipes):
    ours, ref = pipes
    a, b = both(ours, ref, prompt=PROMPT, guidance_rescale=0.7, num_inference_steps=2, output_type="latent")
    assert max_diff(a, b) <= TOL


def test_callback_sees_every_step_and_can_replace_latents(pipes):
    ours, _ = pipes
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, float(t), tuple(tensors)))
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    out = ours(PROMPT, num_inference_steps=3, generator=generator(), output_type="latent",
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][2] == ("latents", "prompt_embeds")
    assert torch.count_nonzero(out) == 0  # the replacement after the last step is what came back


def test_step_context_is_announced_with_python_timesteps(pipes):
    ours, _ = pipes
    seen = []
    handle = ours.unet.register_forward_pre_hook(lambda m, a: seen.append(m.step_context))
    try:
        ours(PROMPT, num_inference_steps=3, generator=generator(), output_type="latent")
    finally:
        handle.remove()
    schedule = ours.scheduler.fresh_copy()
    schedule.set_timesteps(3)
    assert [(c.index, c.count) for c in seen] == [(0, 3), (1, 3), (2, 3)]
    assert [c.timestep for c in seen] == schedule.timesteps.tolist()
    assert all(isinstance(c.timestep, float) for c in seen)
    assert ours.unet.step_context is None  # cleared after the loop


def test_progress_bar_can_be_disabled(pipes, capsys):
    ours, _ = pipes
    pipe = runtime.StableDiffusionPipeline.from_pipe(ours)
    pipe.set_progress_bar_config(disable=False)
    pipe(PROMPT, num_inference_steps=2, output_type="latent")
    assert "2/2" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPT, num_inference_steps=2, output_type="latent")
    assert "2/2" not in capsys.readouterr().err


def test_guidance_embedded_unet_with_lcm_scheduler(pipes, tmp_path):
    """LCM-style UNets (time_cond_proj_dim) get guidance as an embedding, with no CFG batch."""
    import diffusers
    from pipeline_fixtures import _unet

    _unet(seed=9, time_cond_proj_dim=32).save_pretrained(str(tmp_path / "unet"))
    ours, ref = pipes
    mine = runtime.StableDiffusionPipeline.from_pipe(
        ours, unet=runtime.UNet2DConditionModel.from_pretrained(tmp_path / "unet"),
        scheduler=runtime.LCMScheduler.from_config(ours.scheduler.config))
    theirs = diffusers.StableDiffusionPipeline.from_pipe(
        ref, unet=diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")),
        scheduler=diffusers.LCMScheduler.from_config(ref.scheduler.config))
    for p in (mine, theirs):
        p.set_progress_bar_config(disable=True)
    a, b = both(mine, theirs, prompt=PROMPT, num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    assert max_diff(a, b) <= TOL
    c = mine(PROMPT, num_inference_steps=3, guidance_scale=8.0, generator=generator(), output_type="latent").images
    assert max_diff(a, c) > 1e-4  # the guidance embedding is really fed to the UNet
