"""Image-to-image and inpainting (4-channel blending and 9-channel UNet) parity with diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, TOL, generator, test_image

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULERS = [("DDIMScheduler", {}), ("EulerDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {})]


def load(folder, ours_cls, ref_name):
    import diffusers

    ours = ours_cls.from_pretrained(folder)
    ref = getattr(diffusers, ref_name).from_pretrained(str(folder), safety_checker=None)
    ours.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.fixture(scope="module")
def img2img(sd_folder):
    return load(sd_folder, runtime.StableDiffusionImg2ImgPipeline, "StableDiffusionImg2ImgPipeline")


@pytest.fixture(scope="module")
def inpaint4(sd_folder):
    return load(sd_folder, runtime.StableDiffusionInpaintPipeline, "StableDiffusionInpaintPipeline")


@pytest.fixture(scope="module")
def inpaint9(sd_inpaint_folder):
    return load(sd_inpaint_folder, runtime.StableDiffusionInpaintPipeline, "StableDiffusionInpaintPipeline")


def swap(pipes, name, options):
    import diffusers

    ours, ref = pipes
    mine = type(ours).from_pipe(ours, scheduler=runtime.SCHEDULER_CLASSES[name].from_config(ours.scheduler.config, **options))
    theirs = type(ref).from_pipe(ref, scheduler=getattr(diffusers, name).from_config(ref.scheduler.config, **options))
    mine.set_progress_bar_config(disable=True)
    theirs.set_progress_bar_config(disable=True)
    return mine, theirs


def run_both(pipes, gens=None, **kwargs):
    outs = []
    for pipe in pipes:
        gen = [generator(i) for i in range(gens)] if gens else generator()
        outs.append(pipe(generator=gen, **kwargs).images)
    return outs


def diff(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in (a, b))
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name,options", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no_cfg", "cfg"])
def test_img2img_matches_diffusers(img2img, name, options, guidance):
    image, _ = test_image()
    pipes = swap(img2img, name, options)
    for output_type in ("latent", "np"):
        a, b = run_both(pipes, prompt=PROMPT, image=image, strength=0.6, num_inference_steps=5,
                        guidance_scale=guidance, output_type=output_type)
        assert diff(a, b) <= TOL


def test_img2img_negative_prompt_two_images_and_generator_list(img2img):
    image, _ = test_image()
    a, b = run_both(img2img, gens=2, prompt=PROMPT, negative_prompt="blue", image=image, strength=0.75,
                    num_images_per_prompt=2, num_inference_steps=4, output_type="np")
    assert a.shape == (2, 16, 16, 3)
    assert diff(a, b) <= TOL


def test_img2img_tensor_and_numpy_inputs(img2img):
    image, _ = test_image()
    array = np.asarray(image).astype(np.float32)[None] / 255.0  # (1, H, W, 3) in [0, 1]
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    for given in (array, tensor):
        a, b = run_both(img2img, prompt=PROMPT, image=given, strength=0.5, num_inference_steps=4, output_type="latent")
        assert diff(a, b) <= TOL


@pytest.mark.parametrize("name,options", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_4channel_blending_matches_diffusers(inpaint4, name, options, strength):
    image, mask = test_image()
    pipes = swap(inpaint4, name, options)
    for output_type in ("latent", "np"):
        a, b = run_both(pipes, prompt=PROMPT, image=image, mask_image=mask, strength=strength,
                        num_inference_steps=4, guidance_scale=5.0, output_type=output_type)
        assert diff(a, b) <= TOL


@pytest.mark.parametrize("name,options", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_9channel_matches_diffusers(inpaint9, name, options, strength):
    image, mask = test_image()
    pipes = swap(inpaint9, name, options)
    for output_type in ("latent", "np"):
        a, b = run_both(pipes, prompt=PROMPT, image=image, mask_image=mask, strength=strength,
                        num_inference_steps=4, guidance_scale=5.0, output_type=output_type)
        assert diff(a, b) <= TOL


@pytest.mark.parametrize("which", ["inpaint4", "inpaint9"])
def test_inpaint_two_images_per_prompt_without_guidance(request, which):
    image, mask = test_image()
    a, b = run_both(request.getfixturevalue(which), gens=2, prompt=PROMPT, image=image, mask_image=mask,
                    num_images_per_prompt=2, num_inference_steps=3, guidance_scale=1.0, output_type="np")
    assert a.shape == (2, 16, 16, 3)
    assert diff(a, b) <= TOL


def test_inpaint_keeps_the_unmasked_half_closer_to_the_image(inpaint4):
    """Blending really runs: the kept (black-mask) half stays near the input, the repainted half does not."""
    image, mask = test_image()
    ours, _ = inpaint4
    out = ours(PROMPT, image=image, mask_image=mask, num_inference_steps=4, generator=generator(), output_type="latent").images
    from runtime.image_io import preprocess_image
    from runtime.pipelines.vae_codec import encode_image

    target = encode_image(ours, ours.vae, preprocess_image(image), generator())
    kept = (out[..., :4] - target[..., :4]).abs().mean()
    repainted = (out[..., 4:] - target[..., 4:]).abs().mean()
    assert kept < 0.5 * repainted
