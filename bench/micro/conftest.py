"""Fixtures of the per-function benchmarks: one checkpoint, loaded by us and by diffusers/transformers.

``python3 -m pytest bench/micro --benchmark-only [--bench-model small|tiny|sd15|FOLDER] [--bench-size N]``
Not collected by the test run (pyproject's testpaths is tests/).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

IMPLS = ("ours", "diffusers")


def pytest_addoption(parser):
    parser.addoption("--bench-model", default="small", help="tiny | small | sd15 | a checkpoint folder")
    parser.addoption("--bench-size", type=int, default=None, help="image side (default: the model's)")
    parser.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark")


@pytest.fixture(scope="session")
def folder(request) -> Path:
    from bench.make_checkpoint import MODELS, CheckpointSkipped, build_checkpoint

    name = request.config.getoption("--bench-model")
    if name not in MODELS:
        return Path(name)
    cache = Path.home() / ".cache" / "diffusion-runtime" / "bench-checkpoints"
    try:
        return build_checkpoint(name, cache / f"{name}-seed0")
    except CheckpointSkipped as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def side(request, folder) -> int:
    from bench.cli import _default_side

    return request.config.getoption("--bench-size") or _default_side(str(folder))


@pytest.fixture(scope="session")
def rounds(request) -> int:
    return request.config.getoption("--bench-rounds")


@pytest.fixture(scope="session")
def pipes(folder) -> dict:
    """Both pipelines, loaded once; eager fp32."""
    import diffusers

    import runtime

    ours = runtime.StableDiffusionPipeline.from_pretrained(str(folder))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
    return {"ours": ours, "diffusers": ref}


@pytest.fixture(scope="session")
def unet_inputs(pipes, side) -> tuple:
    """(sample, timestep, text context): batch 2 as with classifier-free guidance."""
    unet = pipes["ours"].unet
    factor = 2 ** (len(pipes["ours"].vae.config.block_out_channels) - 1)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, side // factor, side // factor, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor(500), context


def run(benchmark, rounds: int, fn):
    """Time ``fn`` under no_grad: one warm-up round, then ``rounds`` rounds of one call each."""
    def call():
        with torch.no_grad():
            return fn()

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
