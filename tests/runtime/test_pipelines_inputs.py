"""Bad pipeline input: each a clear error (type and message naming the value), never a bad image."""
from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import pytest
import torch

from pipeline_fixtures import PROMPT, generator, test_image

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")
from runtime.errors import InputError


@pytest.fixture(scope="module")
def pipe(sd_folder):
    p = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    p.set_progress_bar_config(disable=True)
    return p


def test_size_not_a_multiple_of_the_vae_factor(pipe):
    assert pipe.vae_scale_factor == 2
    with pytest.raises(InputError, match="height=15 is not a multiple of the VAE factor 2"):
        pipe(PROMPT, height=15, width=16, num_inference_steps=1)
    with pytest.raises(InputError, match="width=9"):
        pipe(PROMPT, height=16, width=9, num_inference_steps=1)
    assert issubclass(InputError, ValueError)


def test_zero_steps_and_too_many_steps(pipe):
    with pytest.raises(InputError, match="num_inference_steps .* got 0"):
        pipe(PROMPT, num_inference_steps=0)
    with pytest.raises(InputError, match="1001"):
        pipe(PROMPT, num_inference_steps=1001)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_unit_interval(pipe, strength):
    image, mask = test_image()
    img2img = runtime.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    with pytest.raises(InputError, match=f"strength must be in \\[0, 1\\], got {strength}"):
        img2img(PROMPT, image=image, strength=strength, num_inference_steps=2)
    inpaint = runtime.StableDiffusionInpaintPipeline.from_pipe(pipe)
    with pytest.raises(InputError, match="strength"):
        inpaint(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=2)


def test_strength_leaving_no_step(pipe):
    image, _ = test_image()
    img2img = runtime.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    with pytest.raises(InputError, match="strength=0.1 with num_inference_steps=2 leaves no denoising step"):
        img2img(PROMPT, image=image, strength=0.1, num_inference_steps=2)


def test_prompt_and_negative_prompt_batch_sizes_differ(pipe):
    with pytest.raises(InputError, match="negative_prompt has batch size 3 but prompt has batch size 2"):
        pipe([PROMPT, "x"], negative_prompt=["a", "b", "c"], num_inference_steps=1)


def test_mask_and_image_sizes_differ(pipe):
    image, _ = test_image(size=16)
    inpaint = runtime.StableDiffusionInpaintPipeline.from_pipe(pipe)
    mask = PIL.Image.new("L", (24, 16))
    with pytest.raises(InputError, match=r"mask_image size \(16, 24\).*image size \(16, 16\)"):
        inpaint(PROMPT, image=image, mask_image=mask, num_inference_steps=1)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    import diffusers

    words = " ".join(["red"] * 80 + ["blue", "circle"])
    with caplog.at_level(logging.WARNING):
        long_out = pipe(words, num_inference_steps=1, generator=generator(), output_type="latent").images
    assert "truncated" in caplog.text and "77 tokens" in caplog.text
    assert "blue circle" in caplog.text  # the dropped part is named
    cut = pipe(" ".join(["red"] * 75), num_inference_steps=1, generator=generator(), output_type="latent").images
    assert torch.equal(long_out, cut)  # the pipeline used the first 75 tokens (+ bos, eos)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(pipe.name_or_path), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(words, num_inference_steps=1, generator=generator(), output_type="latent").images
    assert (long_out - theirs).abs().max() <= 1e-4


def test_nan_latents_are_an_error_not_a_black_image(pipe):
    latents = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(InputError, match="NaN"):
        pipe(PROMPT, latents=latents, num_inference_steps=1, output_type="np")


def test_other_bad_arguments(pipe):
    with pytest.raises(InputError, match="output_type"):
        pipe(PROMPT, num_inference_steps=1, output_type="jpeg")
    with pytest.raises(InputError, match="prompt"):
        pipe(None, num_inference_steps=1)
    with pytest.raises(InputError, match="3 generators"):
        pipe(PROMPT, num_images_per_prompt=2, generator=[generator(i) for i in range(3)], num_inference_steps=1)
    with pytest.raises(InputError, match="latents: expected shape"):
        pipe(PROMPT, latents=torch.zeros(1, 4, 5, 5), num_inference_steps=1)
    with pytest.raises(InputError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPT, num_inference_steps=1, callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["mask"])
    with pytest.raises(InputError, match="image is required"):
        runtime.StableDiffusionImg2ImgPipeline.from_pipe(pipe)(PROMPT, num_inference_steps=1)


def test_image_io_round_trip():
    from runtime.image_io import postprocess, preprocess_image, preprocess_mask

    image, mask = test_image()
    x = preprocess_image(image)
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    back = postprocess(x, "pil")[0]
    assert np.array_equal(np.asarray(back), np.asarray(image))
    m = preprocess_mask(mask)
    assert m.shape == (1, 1, 16, 16) and set(m.unique().tolist()) == {0.0, 1.0}
    from diffusers.image_processor import VaeImageProcessor

    odd = image.resize((17, 19))
    ours = preprocess_image(odd, factor=2)
    assert ours.shape == (1, 3, 18, 16)  # rounded down to the VAE factor
    assert torch.equal(ours, VaeImageProcessor(vae_scale_factor=2).preprocess(odd))
    ref_mask = VaeImageProcessor(vae_scale_factor=2, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    assert torch.equal(preprocess_mask(mask.resize((17, 19)), factor=2), ref_mask.preprocess(mask.resize((17, 19))))
    array = np.asarray(mask).astype(np.float32) / 255.0  # (H, W) in [0, 1]
    assert torch.equal(preprocess_mask(array, factor=2), ref_mask.preprocess(array))
    rgb = np.asarray(image).astype(np.float32)[None] / 255.0  # (1, H, W, 3)
    assert torch.equal(preprocess_image(rgb, factor=2), VaeImageProcessor(vae_scale_factor=2).preprocess(rgb))
