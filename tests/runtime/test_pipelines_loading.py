"""Loading, saving, sharing and concurrency of pipelines (model_index.json contract)."""
from __future__ import annotations

import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, generator, test_image

import runtime

pytestmark = pytest.mark.usefixtures("one_thread")
from runtime.errors import CheckpointNotFoundError, ConfigError


@pytest.fixture(scope="module")
def pipe(sd_folder):
    p = runtime.DiffusionPipeline.from_pretrained(sd_folder)
    p.set_progress_bar_config(disable=True)
    return p


def test_diffusion_pipeline_returns_the_folder_class(pipe):
    assert type(pipe) is runtime.StableDiffusionPipeline
    assert type(pipe.unet).__module__.startswith("runtime.models.")
    assert type(pipe.text_encoder).__module__.startswith("runtime.models.")
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert set(pipe.components) == set(runtime.StableDiffusionPipeline.component_names)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32


def test_unsupported_component_is_named_and_skipped(sd_folder, tmp_path, caplog):
    folder = tmp_path / "with_checker"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["requires_safety_checker"] = True
    (folder / "model_index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING):
        p = runtime.DiffusionPipeline.from_pretrained(folder)
    assert p.safety_checker is None and p.feature_extractor is None
    assert "StableDiffusionSafetyChecker" in caplog.text and "CLIPImageProcessor" in caplog.text
    assert p.config.requires_safety_checker is True


def test_unknown_required_component_and_pipeline_are_errors(sd_folder, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNetMotionModel"]}))
    with pytest.raises(ConfigError, match="UNetMotionModel"):
        runtime.DiffusionPipeline.from_pretrained(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="KandinskyPipeline"):
        runtime.DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        runtime.DiffusionPipeline.from_pretrained(tmp_path / "nowhere")


def test_component_override_is_used_not_reloaded(sd_folder, pipe):
    p = runtime.StableDiffusionPipeline.from_pretrained(sd_folder, unet=pipe.unet, requires_safety_checker=False)
    assert p.unet is pipe.unet
    assert p.config.requires_safety_checker is False


def test_save_pretrained_loads_in_diffusers_with_the_same_output(pipe, tmp_path):
    import diffusers

    pipe.save_pretrained(tmp_path / "saved")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == type(pipe.scheduler).__name__
    a = pipe(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images
    b = ref(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images
    assert np.abs(a - b).max() <= 1e-4
    again = runtime.DiffusionPipeline.from_pretrained(tmp_path / "saved")
    c = again(PROMPT, num_inference_steps=2, generator=generator(), output_type="np").images
    assert np.array_equal(a, c)


def test_from_pipe_shares_modules_and_switches_task(pipe):
    img2img = runtime.AutoPipelineForImage2Image.from_pipe(pipe)
    inpaint = runtime.AutoPipelineForInpainting.from_pipe(pipe)
    back = runtime.AutoPipelineForText2Image.from_pipe(inpaint)
    assert type(img2img) is runtime.StableDiffusionImg2ImgPipeline
    assert type(inpaint) is runtime.StableDiffusionInpaintPipeline
    assert type(back) is runtime.StableDiffusionPipeline
    for other in (img2img, inpaint, back):
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(other, name) is getattr(pipe, name)
    image, mask = test_image()
    out = inpaint(PROMPT, image=image, mask_image=mask, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3)


def test_auto_pipeline_from_pretrained_picks_the_task_class(sd_folder):
    assert type(runtime.AutoPipelineForImage2Image.from_pretrained(sd_folder)) is runtime.StableDiffusionImg2ImgPipeline
    assert type(runtime.AutoPipelineForInpainting.from_pretrained(sd_folder)) is runtime.StableDiffusionInpaintPipeline


def test_to_casts_every_module(pipe):
    p = runtime.StableDiffusionPipeline.from_pipe(pipe)
    p.unet = type(pipe.unet).from_config(pipe.unet.config)  # a private copy to cast
    p.unet.load_state_dict(pipe.unet.state_dict())
    p.to(torch.bfloat16)
    assert p.unet.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    p.to(dtype=torch.float32)
    assert p.unet.dtype == torch.float32


def test_concurrent_calls_equal_sequential_calls(pipe):
    """4 threads on one pipeline (two sharing one scheduler object) give the sequential images."""
    ancestral = runtime.StableDiffusionPipeline.from_pipe(
        pipe, scheduler=runtime.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config))
    unipc = runtime.StableDiffusionPipeline.from_pipe(
        pipe, scheduler=runtime.UniPCMultistepScheduler.from_config(pipe.scheduler.config))
    jobs = [(pipe, 1), (pipe, 2), (ancestral, 3), (unipc, 4)]

    def run(p, seed):
        return p(PROMPT, num_inference_steps=4, generator=generator(seed), output_type="np").images

    sequential = [run(p, s) for p, s in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(k):
        barrier.wait()
        results[k] = run(*jobs[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert np.array_equal(got, want)
    assert not np.array_equal(sequential[0], sequential[1])
