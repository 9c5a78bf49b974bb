"""The shapes model the package ships: where it is, its size, that diffusers loads it and computes
what we compute, and that it draws what held-out prompts ask for.

SHIPPED_MODEL=<folder> points these tests at another folder in the same layout (a training run).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import runtime
from runtime.cli import default_model
from runtime.image_io import to_uint8
from runtime.shapes import adherence, held_out_prompts

FOLDER = Path(os.environ.get("SHIPPED_MODEL") or default_model() or "missing")
# SHIPPED_MODEL=<folder> runs these tests on a training run's folder.
pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(),
                                reason="no shipped model in runtime/assets/shapes yet (issue 6, train/RUNS.md)")
LIMIT_BYTES = 25 * 10**6


def test_the_cli_defaults_to_the_shipped_model():
    assert default_model() is not None, "runtime/assets/shapes is missing: the package ships no model"
    assert (Path(default_model()) / "model_index.json").is_file()
    assert Path(default_model()).resolve().is_relative_to(Path(runtime.__file__).resolve().parent)


def test_the_folder_is_within_the_size_limit():
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert 0 < size <= LIMIT_BYTES, f"{FOLDER}: {size} bytes"


def test_diffusers_loads_it_and_computes_the_same_latents():
    import diffusers

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(FOLDER, safety_checker=None,
                                                               requires_safety_checker=False)
    ours = runtime.StableDiffusionPipeline.from_pretrained(FOLDER)
    assert type(theirs.scheduler).__name__ == type(ours.scheduler).__name__
    prompts = held_out_prompts(2, seed=3)
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, output_type="latent")
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    want = theirs(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == want.shape == (2, 4, 16, 16)
    assert (got - want).abs().max().item() <= 1e-4
    ids_theirs = theirs.tokenizer(prompts, padding="max_length", max_length=theirs.tokenizer.model_max_length).input_ids
    ids_ours = ours.tokenizer(prompts, padding="max_length", max_length=ours.tokenizer.model_max_length)["input_ids"]
    assert ids_theirs == ids_ours


PROMPTS = held_out_prompts(16, seed=11)


def _draw(pipe, prompts):
    out = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, output_type="np",
               generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    return list(to_uint8(out.images))


@pytest.fixture(scope="module")
def shipped():
    pipe = runtime.StableDiffusionPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def eager_score(shipped):
    return adherence(_draw(shipped, PROMPTS), PROMPTS)


def test_level3_defaults_keep_what_it_draws(shipped, eager_score):
    """Level 3 at its defaults (compile off: the same passes without the compile time) reads back at
    most two prompts in 16 worse than eager on any attribute. The defaults before TGATE's gate moved
    to 0.8 and DeepCache ran its first quarter whole failed this (background 0.96 -> 0.62 over 48
    prompts, bench/RESULTS.md)."""
    runtime.optimize(shipped, level=3, compile=False)
    try:
        assert {"deepcache", "tgate", "tome"} <= {p.name for p in shipped.optimization.applied}
        fast = adherence(_draw(shipped, PROMPTS), PROMPTS)
    finally:
        shipped.optimization.revert()
    for key in ("background", "colour", "position", "shape"):
        assert fast[key] >= eager_score[key] - 2 / 16, (key, eager_score, fast)


def test_it_draws_what_held_out_prompts_ask_for(eager_score):
    """Eager, DDIM 20 steps, guidance 7.5, 16 held-out prompts, each attribute a little below issue 6's
    goals (one prompt is 6%; this draw reads shape 13/16, colour 13/16, background 16/16, position
    15/16). The full measurement over 200 prompts is in train/RUNS.md and bench/bench_adherence.py."""
    score = eager_score
    assert score["background"] >= 0.9, score
    assert score["colour"] >= 0.75, score
    assert score["position"] >= 0.75, score
    assert score["shape"] >= 0.7, score
