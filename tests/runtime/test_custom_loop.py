"""diffusers' documented custom denoising loop, run once on diffusers/transformers and once on runtime.

The loop is the "Deconstruct the Stable Diffusion pipeline" code from diffusers' docs
("Understanding pipelines, models and schedulers"), kept as written except for: the
checkpoint (the tiny ``sd_folder``), ``torch_device = "cpu"``, a small size and few steps,
no tqdm, and returning what it computed. The two runs differ in their import lines only.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_fixtures import TOL

pytestmark = pytest.mark.usefixtures("one_thread")

DIFFUSERS_IMPORTS = """\
from transformers import CLIPTextModel, CLIPTokenizer
from diffusers import AutoencoderKL, UNet2DConditionModel, {scheduler}
"""
RUNTIME_IMPORTS = """\
from runtime import CLIPTextModel, CLIPTokenizer
from runtime import AutoencoderKL, UNet2DConditionModel, {scheduler}
"""

LOOP = '''\
from PIL import Image
import torch
{imports}
vae = AutoencoderKL.from_pretrained(repo_id, subfolder="vae", use_safetensors=True)
tokenizer = CLIPTokenizer.from_pretrained(repo_id, subfolder="tokenizer")
text_encoder = CLIPTextModel.from_pretrained(repo_id, subfolder="text_encoder", use_safetensors=True)
unet = UNet2DConditionModel.from_pretrained(repo_id, subfolder="unet", use_safetensors=True)
scheduler = {scheduler}.from_pretrained(repo_id, subfolder="scheduler")

torch_device = "cpu"
vae.to(torch_device)
text_encoder.to(torch_device)
unet.to(torch_device)

prompt = ["a photograph of an astronaut riding a horse"]
height = 64  # default height of Stable Diffusion: 512
width = 64  # default width of Stable Diffusion: 512
num_inference_steps = 4  # Number of denoising steps (the docs: 25)
guidance_scale = 7.5  # Scale for classifier-free guidance
generator = torch.manual_seed(0)  # Seed generator to create the initial latent noise
batch_size = len(prompt)

text_input = tokenizer(
    prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
)
with torch.no_grad():
    text_embeddings = text_encoder(text_input.input_ids.to(torch_device))[0]

max_length = text_input.input_ids.shape[-1]
uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
uncond_embeddings = text_encoder(uncond_input.input_ids.to(torch_device))[0]

text_embeddings = torch.cat([uncond_embeddings, text_embeddings])

latents = torch.randn(
    (batch_size, unet.config.in_channels, height // 8, width // 8),
    generator=generator,
    device=torch_device,
)

latents = latents * scheduler.init_noise_sigma

scheduler.set_timesteps(num_inference_steps)

for t in scheduler.timesteps:
    # expand the latents if we are doing classifier-free guidance to avoid doing two forward passes.
    latent_model_input = torch.cat([latents] * 2)

    latent_model_input = scheduler.scale_model_input(latent_model_input, timestep=t)

    # predict the noise residual
    with torch.no_grad():
        noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample

    # perform guidance
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

    # compute the previous noisy sample x_t -> x_t-1
    latents = scheduler.step(noise_pred, t, latents).prev_sample
    seen.append(latents.clone())

# scale and decode the image latents with vae
latents = 1 / 0.18215 * latents
with torch.no_grad():
    image = vae.decode(latents).sample

image = (image / 2 + 0.5).clamp(0, 1).squeeze()
image = (image.permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy()
image = Image.fromarray(image)
'''


def run_loop(imports: str, scheduler: str, repo_id: str) -> dict:
    source = LOOP.format(imports=imports.format(scheduler=scheduler), scheduler=scheduler)
    namespace = {"repo_id": repo_id, "seen": []}
    exec(compile(source, f"<custom loop: {imports.split()[1]}>", "exec"), namespace)
    return namespace


def test_the_two_sources_differ_in_imports_only():
    a = LOOP.format(imports=DIFFUSERS_IMPORTS.format(scheduler="PNDMScheduler"), scheduler="PNDMScheduler")
    b = LOOP.format(imports=RUNTIME_IMPORTS.format(scheduler="PNDMScheduler"), scheduler="PNDMScheduler")
    diff = [(x, y) for x, y in zip(a.splitlines(), b.splitlines()) if x != y]
    assert len(a.splitlines()) == len(b.splitlines())
    assert diff and all(x.startswith("from ") and y.startswith("from runtime import") for x, y in diff)


@pytest.mark.parametrize("scheduler", ["UniPCMultistepScheduler", "PNDMScheduler"])
def test_documented_custom_loop_gives_diffusers_latents_and_image(sd_folder, scheduler):
    theirs = run_loop(DIFFUSERS_IMPORTS, scheduler, str(sd_folder))
    ours = run_loop(RUNTIME_IMPORTS, scheduler, str(sd_folder))
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert type(ours[name]).__module__.startswith("runtime."), name
        assert not type(theirs[name]).__module__.startswith("runtime."), name
    assert torch.equal(ours["text_input"].input_ids, theirs["text_input"].input_ids)
    assert (ours["text_embeddings"] - theirs["text_embeddings"]).abs().max() <= TOL
    assert len(ours["seen"]) == len(theirs["seen"]) == len(theirs["scheduler"].timesteps)
    for step, (a, b) in enumerate(zip(ours["seen"], theirs["seen"])):
        assert (a - b).abs().max() <= TOL, f"latents after step {step}"
    assert (ours["latents"] - theirs["latents"]).abs().max() <= TOL
    mine, want = np.asarray(ours["image"]), np.asarray(theirs["image"])
    assert mine.shape == want.shape == (16, 16, 3)  # the tiny VAE's factor is 2: 8x8 latents -> 16x16
    assert np.abs(mine.astype(int) - want.astype(int)).max() <= 1  # uint8: at most a rounding step
