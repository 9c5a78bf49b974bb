"""TGATE's guidance drop: the pipelines' ``guidance_gate`` slot (a step run on the conditional half
alone is the unguided call's step exactly), the batch the UNet sees, and TGATE with DeepCache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import optim
import runtime
from runtime.models.errors import OptimizationError
from runtime.optim.parity import psnr
from pipeline_fixtures import quiet_pipeline, test_image

STEPS = 10
PROMPT = "a red circle on a blue square"


def run(pipe, steps=STEPS, **kw):
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


class BatchLog:
    """Records the batch of every UNet call."""

    def __init__(self, unet):
        self.sizes = []
        self.handle = unet.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def inpaint(sd_inpaint_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionInpaintPipeline, sd_inpaint_folder)


@pytest.fixture(scope="module")
def sdxl(sdxl_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionXLPipeline, sdxl_folder)


@pytest.mark.parametrize("which", ["pipe", "inpaint", "sdxl"])
def test_a_gate_open_from_the_first_step_is_the_unguided_call(request, which):
    """Every step on the conditional half alone, unguided: exactly what guidance_scale=1 computes
    (which encodes no negative prompt and never duplicates the batch)."""
    p = request.getfixturevalue(which)
    kw = {}
    if which == "inpaint":
        image, mask = test_image(size=32)
        kw = dict(image=image, mask_image=mask)
    unguided = run(p, steps=4, guidance_scale=1.0, **kw)
    guided = run(p, steps=4, guidance_scale=7.5, **kw)
    p.unet.guidance_gate = lambda index, count: True
    try:
        with BatchLog(p.unet) as log:
            gated = run(p, steps=4, guidance_scale=7.5, **kw)
    finally:
        del p.unet.guidance_gate
    assert log.sizes == [1] * 4
    assert np.array_equal(gated, unguided) and not np.array_equal(gated, guided)


def test_drop_cfg_halves_the_batch_from_the_gate(pipe):
    optim.optimize(pipe, level=0, tgate={"gate_step": 6})
    with BatchLog(pipe.unet) as log:
        dropped = run(pipe)
    assert log.sizes == [2] * 6 + [1] * (STEPS - 6)
    optim.optimize(pipe, level=0, tgate={"gate_step": 6, "drop_cfg": False})
    with BatchLog(pipe.unet) as log:
        kept = run(pipe)
    assert log.sizes == [2] * STEPS
    assert not np.array_equal(dropped, kept)
    pipe.optimization.revert()
    assert "guidance_gate" not in pipe.unet.__dict__ and pipe.unet.guidance_gate is None
    eager = run(pipe)
    for out in (dropped, kept):
        assert psnr(out, eager) >= optim.PASSES["tgate"].psnr_floor_db


def test_drop_cfg_reuses_the_mean_of_both_halves(pipe):
    """After the gate, each cross-attention returns the mean of the unconditional and conditional
    outputs it computed at the step before the gate, and computes nothing."""
    modules = [m for m in pipe.unet.attention_modules() if m.is_cross_attention]
    seen = {id(m): [] for m in modules}
    for m in modules:
        m.register_forward_hook(lambda mod, args, out: seen[id(mod)].append(out.clone()))
    try:
        optim.optimize(pipe, level=0, tgate={"gate_step": 3})
        with BatchLog(pipe.unet) as log:
            run(pipe, steps=5)
    finally:
        for m in modules:
            m._forward_hooks.clear()
    assert log.sizes == [2, 2, 2, 1, 1]
    for outs in seen.values():
        assert [o.shape[0] for o in outs] == [2, 2, 2, 1, 1]
        uncond, cond = outs[2].chunk(2)
        assert torch.equal(outs[3], (uncond + cond) / 2) and torch.equal(outs[4], outs[3])


def test_unguided_calls_ignore_the_drop(pipe):
    """guidance_scale=1 has no halves to drop: TGATE then only caches, at the full batch."""
    optim.optimize(pipe, level=0, tgate={"gate_step": 6, "drop_cfg": True})
    with BatchLog(pipe.unet) as log:
        a = run(pipe, guidance_scale=1.0)
    optim.optimize(pipe, level=0, tgate={"gate_step": 6, "drop_cfg": False})
    assert log.sizes == [1] * STEPS and np.array_equal(run(pipe, guidance_scale=1.0), a)


def test_drop_cfg_with_deepcache(pipe):
    """Deep features stored on a guided step and reused after the gate are the mean of both halves."""
    eager = run(pipe)
    optim.optimize(pipe, level=0, tgate={"gate_step": 5}, deepcache={"interval": 2, "start": 0})
    with BatchLog(pipe.unet) as log:
        out = run(pipe)
    assert log.sizes == [2] * 5 + [1] * 5
    assert np.isfinite(out).all() and psnr(out, eager) >= optim.PASSES["deepcache"].psnr_floor_db
    slot = pipe.unet.feature_cache
    pipe.unet.announce_step(4, STEPS, 0.0, guided=True)
    stored = torch.randn(2, 3, 4, 4)
    slot.features = stored
    pipe.unet.announce_step(5, STEPS, 0.0, guided=False)
    assert torch.equal(slot.features, (stored[:1] + stored[1:]) / 2)
    pipe.unet.clear_step()


def test_bad_drop_cfg_is_an_error(pipe):
    with pytest.raises(OptimizationError, match="drop_cfg must be True or False"):
        optim.optimize(pipe, level=0, tgate={"drop_cfg": "yes"})
