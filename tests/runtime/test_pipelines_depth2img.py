"""Depth-to-image against diffusers 0.42.1 on a random tiny SD 2 depth pipeline (5-channel UNet,
hybrid DPT estimator as in diffusers' fast tests): folder loading, depth_map given or estimated,
guidance, batches, no estimator, saving, single files, and optimize levels 1-3."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, TOL, _tokenizer, _unet, _vae, ddim_scheduler, generator, test_image

import runtime
from runtime.models.errors import ConfigError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
EXACT_TOL = 1e-4  # tests/optim/test_passes.py: fp32 max-abs on final latents, level 1
BACKBONE = {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
            "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
            "hidden_sizes": [96, 192, 384, 768], "num_groups": 2}


def build_depth(root: Path, name: str = "depth") -> Path:
    """diffusers' depth pipeline, SD 2 style (OpenCLIP-width text encoder, linear projections), saved."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    tokenizer = _tokenizer(root, name, pad_token="!")
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=64, intermediate_size=37, num_attention_heads=1, num_hidden_layers=2, vocab_size=len(tokenizer),
        hidden_act="gelu", layer_norm_eps=1e-5)).eval()
    torch.manual_seed(12)
    estimator = DPTForDepthEstimation(DPTConfig(
        image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
        backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
        is_hybrid=True, backbone_config=BACKBONE, backbone_featmap_shape=[1, 384, 24, 24])).eval()
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=_unet(5, cross_attention_dim=64, use_linear_projection=True, attention_head_dim=(1, 1)),
        scheduler=ddim_scheduler(), depth_estimator=estimator,
        feature_extractor=DPTImageProcessor(size={"height": 32, "width": 32}))
    pipe.save_pretrained(str(root / name))
    return root / name


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_depth(tmp_path_factory.mktemp("depth"))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(folder):
    import diffusers

    return (quiet(runtime.StableDiffusionDepth2ImgPipeline.from_pretrained(folder)),
            quiet(diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(folder))))


def image32(seed: int = 7):
    return test_image(seed, size=32)[0]


def depth_map(batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 24, 20, generator=torch.Generator().manual_seed(seed)) * 5


def run(pipe, gens=None, **kwargs):
    kwargs = {"prompt": PROMPT, "image": image32(), "strength": 0.7, "num_inference_steps": STEPS,
              "output_type": "latent", **kwargs}
    gen = [generator(i) for i in range(gens)] if gens else generator()
    return pipe(generator=gen, **kwargs).images


def diff(a, b) -> float:
    a, b = (torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x in (a, b))
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# ---- loading --------------------------------------------------------------------------------
def test_folder_loads_with_our_classes(folder, pipes):
    pipe = runtime.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is runtime.StableDiffusionDepth2ImgPipeline
    assert type(pipe.depth_estimator).__name__ == "DPTForDepthEstimation"
    assert type(pipe.depth_estimator).__module__ == "runtime.models.dpt"
    assert type(pipe.feature_extractor).__module__ == "runtime.models.dpt_image_processor"
    assert pipe.unet.config.in_channels == 5
    assert runtime.StableDiffusionDepth2ImgPipeline in runtime.PIPELINE_CLASSES.values()


# ---- parity with diffusers -------------------------------------------------------------------
@pytest.mark.parametrize("given", [False, True], ids=["estimator", "depth_map"])
@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no_cfg", "cfg"])
def test_latents_match_diffusers(pipes, given, guidance):
    kwargs = {"depth_map": depth_map()} if given else {}
    ours, ref = (run(p, guidance_scale=guidance, **kwargs) for p in pipes)
    assert ours.shape == (1, 4, 16, 16)
    assert diff(ours, ref) <= TOL


def test_images_and_batches_match_diffusers(pipes):
    a, b = (run(p, output_type="np", guidance_scale=5.0) for p in pipes)
    assert a.shape == (1, 32, 32, 3) and diff(a, b) <= TOL
    # two prompts, two images each, a negative prompt, a generator per image, a batch of depth maps
    kwargs = dict(prompt=[PROMPT, "blue"], negative_prompt=["red", "circle"], num_images_per_prompt=2,
                  image=[image32(1), image32(2)], guidance_scale=4.0, strength=0.8)
    a, b = (run(p, gens=4, **kwargs) for p in pipes)
    assert a.shape == (4, 4, 16, 16) and diff(a, b) <= TOL
    a, b = (run(p, gens=2, num_images_per_prompt=2, depth_map=depth_map(2)) for p in pipes)
    assert diff(a, b) <= TOL


def test_scheduler_swap_and_callback_match_diffusers(pipes):
    import diffusers

    ours, ref = pipes
    mine = quiet(type(ours).from_pipe(ours, scheduler=runtime.EulerDiscreteScheduler.from_config(ours.scheduler.config)))
    theirs = quiet(type(ref).from_pipe(ref, scheduler=diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)))
    seen = {}

    def callback(pipe, i, t, tensors):
        seen.setdefault(type(pipe).__module__.split(".")[0], []).append(tensors["depth_mask"].shape)
        return tensors

    a, b = (run(p, guidance_scale=3.0, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents", "depth_mask"]) for p in (mine, theirs))
    assert diff(a, b) <= TOL
    assert seen["runtime"] == seen["diffusers"] and seen["runtime"][0] == (2, 1, 16, 16)


def test_outputs_are_diffusers_shaped(pipes):
    ours, _ = pipes
    out = ours(PROMPT, image=image32(), num_inference_steps=2, output_type="pil", generator=generator())
    assert type(out).__name__ == "ImagePipelineOutput" and out.images[0].size == (32, 32)
    tup = ours(PROMPT, image=image32(), num_inference_steps=2, output_type="latent", return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1


# ---- without an estimator ---------------------------------------------------------------------
def test_depth_map_without_estimator(folder, pipes):
    bare = quiet(runtime.StableDiffusionDepth2ImgPipeline.from_pretrained(folder, depth_estimator=None,
                                                                          feature_extractor=None))
    with pytest.raises(InputError, match="depth_map"):
        run(bare)
    assert torch.equal(run(bare, depth_map=depth_map()), run(pipes[0], depth_map=depth_map()))
    with pytest.raises(InputError, match="depth_map"):
        run(bare, depth_map=torch.zeros(1, 2, 8, 8))


# ---- saving and single files ------------------------------------------------------------------
def test_saved_folder_loads_in_diffusers(pipes, tmp_path):
    import diffusers

    ours, ref = pipes
    ours.save_pretrained(tmp_path / "saved")
    again = quiet(diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(tmp_path / "saved")))
    assert diff(run(again), run(ref)) <= TOL


def test_single_file(folder, pipes, tmp_path):
    ours = pipes[0]
    path = ours.save_single_file(tmp_path / "depth.safetensors")
    cls = runtime.StableDiffusionDepth2ImgPipeline
    loaded = quiet(cls.from_single_file(str(path), tokenizer=ours.tokenizer, scheduler=ours.scheduler))
    assert loaded.depth_estimator is None and loaded.feature_extractor is None
    with pytest.raises(InputError, match="depth_map"):
        run(loaded)
    assert diff(run(loaded, depth_map=depth_map()), run(ours, depth_map=depth_map())) <= TOL
    with_config = quiet(cls.from_single_file(str(path), config=str(folder)))
    assert type(with_config.depth_estimator).__module__ == "runtime.models.dpt"
    assert diff(run(with_config), run(ours)) <= TOL
    with pytest.raises(ConfigError, match="StableDiffusionDepth2ImgPipeline"):
        runtime.StableDiffusionImg2ImgPipeline.from_single_file(str(path), tokenizer=ours.tokenizer)


# ---- optimize ---------------------------------------------------------------------------------
def test_optimize_levels(folder):
    from runtime import optim
    from runtime.optim.parity import psnr

    pipe = quiet(runtime.StableDiffusionDepth2ImgPipeline.from_pretrained(folder))
    kwargs = dict(num_inference_steps=10, guidance_scale=5.0, strength=0.9)
    eager, eager_np = run(pipe, **kwargs), run(pipe, output_type="np", **kwargs)
    optim.optimize(pipe, level=1)
    assert {"attention", "fused_qkv"} <= {p.name for p in pipe.optimization.applied}
    assert all(m.fused == "qkv" for m in pipe.depth_estimator.attention_modules())  # the estimator too
    assert pipe.unet.config.in_channels == 5
    assert diff(run(pipe, **kwargs), eager) <= EXACT_TOL
    optim.optimize(pipe, level=2, compile=False)  # compile: minutes on CPU, covered by tests/optim
    out = run(pipe, output_type="np", **kwargs)
    assert np.isfinite(out).all() and psnr(out, eager_np) >= optim.precision.PrecisionPass.psnr_floor_db
    optim.optimize(pipe, level=3, compile=False)
    out = run(pipe, output_type="np", **kwargs)
    assert np.isfinite(out).all()
    pipe.optimization.revert()
    assert torch.equal(run(pipe, **kwargs), eager)
