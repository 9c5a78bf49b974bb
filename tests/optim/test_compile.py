"""The compile pass: near-exact output, no recompilation across resolutions and batch sizes after
warm-up, and inductor's on-disk cache hit from a second process (the persistent cache works).

Compiles only the UNet, regionally (each repeated block once), to keep the inductor work small.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import optim
import runtime
from runtime.optim.parity import max_abs

COMPILE = {"targets": ("unet",), "regional": True, "force": True}  # forced: on CPU compile is opt-in
TOL = 1e-4  # fp32 max-abs: inductor reorders float work


def run(pipe, size, n=1):
    return pipe("a red circle", num_inference_steps=2, height=size, width=size, num_images_per_prompt=n,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inductor-cache")


@pytest.fixture(scope="module")
def compiled(sd_folder, one_thread, cache_dir):
    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    eager = {size: run(pipe, size) for size in (16, 24)}
    optim.optimize(pipe, level=0, compile={**COMPILE, "cache_dir": str(cache_dir)})
    yield pipe, eager
    pipe.optimization.revert()


def test_compiled_matches_eager_and_never_recompiles(compiled):
    pipe, eager = compiled
    assert [p.name for p in pipe.optimization.applied] == ["compile"]
    assert max_abs(run(pipe, 16), eager[16]) <= TOL  # warm-up at one size
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert max_abs(run(pipe, 24), eager[24]) <= TOL
        for size, n in ((32, 2), (40, 3), (16, 4)):
            out = run(pipe, size, n)
            assert out.shape == (n, size, size, 3) and np.isfinite(out).all()


def test_revert_drops_compiled_calls(compiled, cache_dir):
    pipe, eager = compiled
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in optim.compile.REGIONAL_BLOCKS]
    assert blocks and all(m.call_with is not None for m in blocks)
    # public API only: torch.compile(module) in the module's call_with slot, no private attribute set
    assert all(m._compiled_call_impl is None for m in pipe.unet.modules())
    report = pipe.optimization
    report.revert()
    assert all(m.call_with is None and "call_with" not in vars(m) for m in blocks)
    assert np.array_equal(run(pipe, 16), eager[16])
    optim.optimize(pipe, level=0, compile={**COMPILE, "cache_dir": str(cache_dir)})  # for the next test


SECOND_PROCESS = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import runtime
    from runtime import optim
    from torch._dynamo.utils import counters
    pipe = runtime.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    optim.optimize(pipe, level=0, compile={"targets": ("unet",), "regional": True, "force": True, "cache_dir": sys.argv[2]})
    pipe("a red circle", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0))
    print(json.dumps(dict(counters["inductor"])))
""")


def test_second_process_hits_the_persistent_cache(compiled, sd_folder, cache_dir):
    pipe, _ = compiled
    run(pipe, 16)  # the first process has populated cache_dir
    assert any(cache_dir.iterdir())
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, str(sd_folder), str(cache_dir)],
                          capture_output=True, text=True, cwd=root, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats.get("fxgraph_cache_hit", 0) > 0
    assert stats.get("fxgraph_cache_miss", 0) == 0, stats


def test_level3_composes_with_compile_without_recompiles(compiled, cache_dir):
    """DeepCache, TGATE and ToMe hooks stay eager; hook-free blocks compile (regional)."""
    pipe, _ = compiled
    settings = dict(precision=False, tome={"max_downsample": 2})
    optim.optimize(pipe, level=3, compile=False, **settings)
    eager_l3 = {size: run(pipe, size) for size in (16, 24)}
    optim.optimize(pipe, level=3, compile={"targets": ("unet",), "cache_dir": str(cache_dir)}, **settings)
    assert "measured slower" in pipe.optimization.skipped["compile"]  # CPU: auto skips regional compile
    optim.optimize(pipe, level=3, compile={"targets": ("unet",), "cache_dir": str(cache_dir), "regional": True, "force": True},
                   **settings)
    assert "regionally" in pipe.optimization.notes["compile"]
    assert max_abs(run(pipe, 16), eager_l3[16]) <= TOL  # warm-up: both DeepCache paths run
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert max_abs(run(pipe, 16), eager_l3[16]) <= TOL
        assert max_abs(run(pipe, 24), eager_l3[24]) <= TOL


@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_cpu_pipelines_skip_compile_unless_forced(sd_folder, one_thread):
    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    optim.optimize(pipe, level=0, precision=True, compile={"targets": ("unet",)})
    assert [p.name for p in pipe.optimization.applied] == ["precision"]
    assert "bf16 on CPU" in pipe.optimization.skipped["compile"] and "force=True" in pipe.optimization.skipped["compile"]
    assert optim.compile.CompilePass(targets=("unet",), force=True).supports(pipe) is None
    pipe.optimization.revert()
    assert "fp32 on CPU" in optim.compile.CompilePass(targets=("unet",)).supports(pipe)  # fp32 too: opt-in
    assert optim.compile.CompilePass(targets=("unet",), force=True).supports(pipe) is None
