"""SDXL image-to-image and inpainting against diffusers, and the SDXL auto-pipeline switches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, TOL, generator, test_image

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(sdxl_folder):
    import diffusers

    ours = runtime.DiffusionPipeline.from_pretrained(sdxl_folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    return ours, ref


def task(pipes, ours_auto, ref_cls_name, scheduler=None):
    import diffusers

    ours, ref = pipes
    mine = getattr(runtime, ours_auto).from_pipe(ours)
    theirs = getattr(diffusers, ref_cls_name).from_pipe(ref)
    if scheduler:
        mine.scheduler = runtime.SCHEDULER_CLASSES[scheduler].from_config(ours.scheduler.config)
        theirs.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    for p in (mine, theirs):
        p.set_progress_bar_config(disable=True)
    return mine, theirs


def diff(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in (a, b))
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no_cfg", "cfg"])
def test_sdxl_img2img_matches_diffusers(base, scheduler, guidance):
    mine, theirs = task(base, "AutoPipelineForImage2Image", "StableDiffusionXLImg2ImgPipeline", scheduler)
    assert type(mine) is runtime.StableDiffusionXLImg2ImgPipeline
    image, _ = test_image()
    for output_type in ("latent", "np"):
        kwargs = dict(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=guidance,
                      negative_prompt="blue", negative_original_size=(8, 8), output_type=output_type)
        a, b = (p(generator=generator(), **kwargs).images for p in (mine, theirs))
        assert diff(a, b) <= TOL


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_sdxl_inpaint_matches_diffusers(base, scheduler, strength):
    mine, theirs = task(base, "AutoPipelineForInpainting", "StableDiffusionXLInpaintPipeline", scheduler)
    assert type(mine) is runtime.StableDiffusionXLInpaintPipeline
    image, mask = test_image()
    for output_type in ("latent", "np"):
        kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=4,
                      num_images_per_prompt=2, output_type=output_type)
        a, b = (p(generator=generator(), **kwargs).images for p in (mine, theirs))
        assert diff(a, b) <= TOL


def test_sdxl_auto_pipelines_share_weights(base):
    ours, _ = base
    inpaint = runtime.AutoPipelineForInpainting.from_pipe(ours)
    back = runtime.AutoPipelineForText2Image.from_pipe(inpaint)
    assert type(back) is runtime.StableDiffusionXLPipeline
    assert back.unet is ours.unet and back.text_encoder_2 is ours.text_encoder_2


def test_sdxl_refiner_layout_with_aesthetic_score(tmp_path):
    """One projection text encoder, no text_encoder/tokenizer, aesthetic score in the time ids."""
    import diffusers
    from pipeline_fixtures import build_sdxl_refiner

    folder = build_sdxl_refiner(tmp_path)
    ours = runtime.DiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder))
    assert type(ours) is runtime.StableDiffusionXLImg2ImgPipeline
    assert ours.text_encoder is None and ours.config.requires_aesthetics_score is True
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    image, _ = test_image()
    kwargs = dict(prompt=PROMPT, image=image, strength=0.5, num_inference_steps=4, aesthetic_score=7.0,
                  negative_aesthetic_score=2.0, output_type="latent")
    a, b = (p(generator=generator(), **kwargs).images for p in (ours, ref))
    assert diff(a, b) <= TOL
    c = ours(generator=generator(), **{**kwargs, "aesthetic_score": 3.0}).images
    assert diff(a, c) > 1e-4  # the aesthetic score reaches the UNet


def test_sdxl_save_pretrained_loads_in_diffusers(base, tmp_path):
    import diffusers

    ours, _ = base
    ours.save_pretrained(tmp_path / "saved")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "saved"))
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    a, b = (p(PROMPT, prompt_2="blue!", num_inference_steps=2, generator=generator(), output_type="np").images
            for p in (ours, ref))
    assert diff(a, b) <= TOL
