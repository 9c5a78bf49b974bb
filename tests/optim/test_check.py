"""optimize(check=...): the approximate passes are measured against eager and backed off."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from runtime import optim
import runtime
from runtime.models.errors import OptimizationError
from runtime.optim.parity import psnr
from pipeline_fixtures import quiet_pipeline

CALL = {"prompt": "a red circle on a blue square", "num_inference_steps": 10}
APPROXIMATE = {"deepcache": {}, "tgate": {}, "tome": {"max_downsample": 2}}


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    p = quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)
    yield p
    if getattr(p, "optimization", None) is not None:
        p.optimization.revert()


def run(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_check_keeps_a_plan_within_the_floor(pipe):
    eager = run(pipe)
    optim.optimize(pipe, level=0, check={**CALL, "floor_db": 1.0}, **APPROXIMATE)
    report = pipe.optimization
    assert sorted(p.name for p in report.applied) == sorted(APPROXIMATE)
    assert report.check["switched_off"] == [] and report.check["psnr_db"] >= 1.0
    # The measured PSNR is the one this call gives now (same prompt, steps and seed).
    assert math.isclose(report.check["psnr_db"], psnr(run(pipe), eager), abs_tol=0.01)
    assert "parity check passed" in str(report)
    report.revert()
    assert np.array_equal(run(pipe), eager)


def test_check_switches_off_in_order_until_within_the_floor(pipe):
    eager = run(pipe)
    optim.optimize(pipe, level=0, check={**CALL, "floor_db": 1000.0}, **APPROXIMATE)
    report = pipe.optimization
    assert report.check["switched_off"] == ["tgate", "tome", "deepcache"]
    assert [m["passes"] for m in report.check["measured"]] == [
        ["tgate", "tome", "deepcache"], ["tome", "deepcache"], ["deepcache"], []]
    assert report.applied == [] and report.check["psnr_db"] == math.inf
    assert np.array_equal(run(pipe), eager)  # nothing approximate is left: eager exactly
    assert "switched off tgate, tome, deepcache" in report.notes["check"]
    assert report.as_dict()["check"]["floor_db"] == 1000.0


def test_check_leaves_exact_plans_alone(pipe):
    optim.optimize(pipe, level=1, check=True)
    assert pipe.optimization.check is None and "check" not in pipe.optimization.notes


def test_check_options_are_validated(pipe):
    with pytest.raises(OptimizationError, match="check must be True, False or a dict"):
        optim.optimize(pipe, level=3, check="yes")
    with pytest.raises(OptimizationError, match="floor_db must be a positive number"):
        optim.optimize(pipe, level=3, check={"floor_db": -3})
    with pytest.raises(OptimizationError, match="check options num_steps are not arguments of"):
        optim.optimize(pipe, level=0, check={"num_steps": 3}, tgate={})
    assert getattr(pipe, "optimization", None) is None
