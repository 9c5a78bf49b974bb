"""Concurrency: 8 threads x 3 requests over a level-0 and a level-3 pipeline and their from_pipe
siblings (img2img, inpaint; five schedulers), mixing sizes, guidance scales, num_images_per_prompt
and callbacks. Every image equals its sequential twin (torch.equal, one intra-op thread), and
every callback saw the same steps and latents. bench/bench_concurrency.py runs the full 8 x 25."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.bench_concurrency import make_requests, mismatches, run_concurrent, run_sequential


@pytest.fixture
def pipes(stress_pipes):
    return stress_pipes


def test_concurrent_images_equal_their_sequential_twins(pipes):
    assert torch.get_num_threads() == 1
    requests = make_requests(8 * 3, sizes=(16, 24), steps=(2, 3), seed=1)
    assert {r.level for r in requests} == {0, 3} and {r.task for r in requests} == {"text2image", "img2img", "inpaint"}
    sequential = run_sequential(pipes, requests)
    concurrent = run_concurrent(pipes, requests, threads=8)
    assert not mismatches(requests, sequential, concurrent)
    assert all(r.images.shape[0] == q.num_images_per_prompt for r, q in zip(concurrent, requests))


def test_shared_components_are_the_same_objects(pipes):
    by_level = {}
    for (level, _, _), pipe in pipes.items():
        by_level.setdefault(level, set()).add((id(pipe.unet), id(pipe.vae), id(pipe.text_encoder)))
    assert all(len(ids) == 1 for ids in by_level.values())


def test_concurrent_calls_with_a_lora_at_per_request_scales_equal_their_sequential_twins(sd_folder):
    """A LoRA adapter on the level-0 and level-3 pipelines, each request at its own call-time scale
    (cross_attention_kwargs={"scale": s}, or none): the scale is the calling thread's, so no request
    sees another's, and the adapter changes the images (scale 0 against 1)."""
    from bench.bench_concurrency import build_pipes, run_one

    pipes = build_pipes(sd_folder, lora=True)
    requests = make_requests(8 * 2, sizes=(16,), steps=(2,), seed=3, lora=True)
    assert {r.lora_scale for r in requests} >= {None, 0.0, 1.0}
    sequential = run_sequential(pipes, requests)
    concurrent = run_concurrent(pipes, requests, threads=8)
    assert not mismatches(requests, sequential, concurrent)
    req = replace(requests[0], lora_scale=0.0, level=0, task="text2image")
    assert not torch.equal(run_one(pipes, req).images, run_one(pipes, replace(req, lora_scale=1.0)).images)
