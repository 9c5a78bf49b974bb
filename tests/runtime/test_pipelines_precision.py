"""Reduced precision: latents and scheduler math stay fp32, fp16 VAEs with force_upcast decode in fp32."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, generator

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")
from runtime.image_io import postprocess


@pytest.fixture(scope="module")
def pipe(sd_folder):
    p = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    p.set_progress_bar_config(disable=True)
    return p


def test_half_unet_keeps_latents_fp32_and_fp16_vae_decodes_in_fp32(pipe):
    unet = copy.deepcopy(pipe.unet).to(torch.bfloat16)
    vae = copy.deepcopy(pipe.vae).to(torch.float16)
    assert vae.config.force_upcast
    half = runtime.StableDiffusionPipeline.from_pipe(pipe, unet=unet, vae=vae)
    seen = {}

    def callback(p, i, t, tensors):
        seen.update({k: v.dtype for k, v in tensors.items()})
        return {}

    latents = half(PROMPT, num_inference_steps=2, generator=generator(), output_type="latent",
                   callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert seen == {"latents": torch.float32, "prompt_embeds": torch.bfloat16}
    images = half(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images
    assert vae.dtype == torch.float16  # the shared VAE was not cast in place
    vae32 = copy.deepcopy(vae).float()  # the same fp16-rounded weights, run in fp32
    with torch.no_grad():
        want = postprocess(vae32.decode(latents / vae.config.scaling_factor, return_dict=False)[0], "np")
    assert np.array_equal(images, want)
    full = pipe(PROMPT, num_inference_steps=2, generator=generator(), output_type="latent").images
    assert (latents - full).abs().max() < 0.1 * full.abs().max()  # bf16 UNet stays close to fp32


def test_initial_noise_follows_diffusers_rule():
    from diffusers.utils.torch_utils import randn_tensor

    from runtime.models.noise import randn_tensor as seeded_randn  # the one implementation pipelines draw from

    shape = (3, 4, 5, 6)
    assert torch.equal(seeded_randn(shape, generator(1)), randn_tensor(shape, generator=generator(1)))
    gens = lambda: [generator(i) for i in range(3)]  # noqa: E731
    assert torch.equal(seeded_randn(shape, gens()), randn_tensor(shape, generator=gens()))
    assert torch.equal(seeded_randn(shape, [generator(4)]), randn_tensor(shape, generator=[generator(4)]))
    assert seeded_randn(shape, generator(1), dtype=torch.float16).dtype == torch.float16
