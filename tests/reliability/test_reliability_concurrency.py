"""Concurrency: 8 threads x 3 requests over a level-0 and a level-3 pipeline and their from_pipe
siblings (img2img, inpaint; five schedulers), mixing sizes, guidance scales, num_images_per_prompt
and callbacks. Every image equals its sequential twin (torch.equal, one intra-op thread), and
every callback saw the same steps and latents. bench/bench_concurrency.py runs the full 8 x 25."""
from __future__ import annotations

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
