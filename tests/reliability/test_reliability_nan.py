"""NaN and overflow guards: in loaded weights (opt-in ``check_finite=True``, file and key named), in
the denoising loop (the step and the component named) and out of the VAE (the dtype named)."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from runtime.errors import CheckpointError, InputError

KEY = "decoder.conv_out.weight"


@pytest.fixture(scope="module")
def nan_sd(sd_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan") / "sd"
    shutil.copytree(sd_folder, folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors[KEY][0, 0, 0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


def test_check_finite_names_file_and_key(nan_sd):
    with pytest.raises(CheckpointError, match=rf"diffusion_pytorch_model.safetensors: weight '{KEY}'.*1 NaN/inf"):
        runtime.AutoencoderKL.from_pretrained(nan_sd / "vae", check_finite=True)
    with pytest.raises(CheckpointError, match=KEY):
        runtime.StableDiffusionPipeline.from_pretrained(nan_sd, check_finite=True)


def test_check_finite_is_opt_in(nan_sd, sd_folder):
    vae = runtime.AutoencoderKL.from_pretrained(nan_sd / "vae")  # the default reads nothing twice
    assert not all(torch.isfinite(t).all() for t in vae.state_dict().values())  # loaded as the file has it
    pipe = runtime.StableDiffusionPipeline.from_pretrained(sd_folder, check_finite=True)  # finite weights load
    assert all(torch.isfinite(t).all() for t in pipe.unet.state_dict().values())


@pytest.fixture
def pipe(sd_folder):
    p = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    p.set_progress_bar_config(disable=True)
    return p


CALL = dict(prompt="a red circle", num_inference_steps=3, height=16, width=16, output_type="pt")


def test_nan_in_the_unet_names_the_step_and_the_unet(pipe):
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(InputError, match=r"step 1 of 3 \(timestep \d+\): the UNet's noise prediction holds"):
        pipe(**CALL, generator=torch.Generator().manual_seed(0))


def test_inf_from_a_callback_is_caught_at_the_next_step(pipe):
    def poison(p, i, t, tensors):
        return {"latents": tensors["latents"] * float("inf")} if i == 1 else {}

    with pytest.raises(InputError, match=r"step 3 of 3 .*: the UNet's noise prediction"):
        pipe(**CALL, generator=torch.Generator().manual_seed(0), callback_on_step_end=poison)


def test_scheduler_step_that_overflows_is_named(pipe, monkeypatch):
    real = type(pipe.scheduler).step

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out[0].fill_(float("nan")) if isinstance(out, tuple) else out.prev_sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(type(pipe.scheduler), "step", step)
    with pytest.raises(InputError, match=r"step 1 of 3 .*the latents after DDIMScheduler.step"):
        pipe(**CALL, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vae_overflow_names_the_dtype(pipe, dtype, monkeypatch):
    from runtime.pipelines import vae_codec

    # an fp16 VAE with force_upcast (this one's config) decodes in fp32; take the fp16 path itself
    monkeypatch.setattr(vae_codec, "needs_upcast", lambda vae: False)
    pipe.vae.to(dtype)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(torch.finfo(dtype).max)
    with pytest.raises(InputError, match=rf"VAE decoder's output holds .* {dtype}.*overflowed"):
        pipe(**CALL, generator=torch.Generator().manual_seed(0))
