"""conv_prepack: oneDNN convolutions with weights packed once, against eager convolutions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optim
import runtime
from optim.conv_prepack import packed_forward
from optim.parity import max_abs, psnr

from pipeline_fixtures import assert_same_state, pipeline_state as state

EXACT_TOL = 1e-4  # fp32 max-abs on final latents over a 10-step run, as for every exact pass (issue 4)

STEPS = 10


def run(pipe, output_type="np"):
    return pipe("a red circle on a blue square", num_inference_steps=STEPS, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    p = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def eager(pipe):
    return {"np": run(pipe), "latent": run(pipe, "latent")}


@pytest.fixture(autouse=True)
def always_revert(request):
    yield
    if "pipe" in request.fixturenames:
        p = request.getfixturevalue("pipe")
        if getattr(p, "optimization", None) is not None:
            p.optimization.revert()


def convs(pipe):
    return [c for m in optim.components.pipeline_models(pipe).values() for c in m.modules() if isinstance(c, nn.Conv2d)]


def used_convs(pipe):
    """The convolutions text-to-image runs (the VAE encoder's do not)."""
    models = (pipe.unet, pipe.vae.decoder, pipe.vae.post_quant_conv)
    return [c for m in models for c in m.modules() if isinstance(c, nn.Conv2d)]


def test_fp32_matches_eager_and_revert_is_exact(pipe, eager):
    before = state(pipe)
    optim.optimize(pipe, level=0, conv_prepack={"fp32": True})
    assert [p.name for p in pipe.optimization.applied] == ["conv_prepack"]
    assert "convolutions packed" in str(pipe.optimization)
    assert max_abs(run(pipe, "latent"), eager["latent"]) <= EXACT_TOL
    assert np.abs(run(pipe) - eager["np"]).max() <= 1e-4  # the decode too
    assert all(c.forward.packed_cache for c in used_convs(pipe))  # every convolution ran packed
    pipe.optimization.revert()
    assert not any("forward" in c.__dict__ for c in convs(pipe))
    assert_same_state(state(pipe), before)
    assert np.array_equal(run(pipe), eager["np"])


@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_with_precision_stays_within_the_precision_bound(pipe, eager):
    optim.optimize(pipe, level=0, precision=True)
    precision_only = run(pipe)
    optim.optimize(pipe, level=0, precision=True, conv_prepack=True)
    assert any(c.weight.dtype == torch.bfloat16 for c in convs(pipe))
    out = run(pipe)
    assert all(c.forward.packed_cache for c in used_convs(pipe))
    assert psnr(out, eager["np"]) >= optim.precision.PrecisionPass.psnr_floor_db
    assert psnr(out, precision_only) >= optim.precision.PrecisionPass.psnr_floor_db


def test_applying_twice_is_safe_and_level2_plans_it(pipe, eager):
    optim.optimize(pipe, level=0, conv_prepack={"fp32": True})
    optim.optimize(pipe, level=0, conv_prepack={"fp32": True})  # reverts first
    assert max_abs(run(pipe, "latent"), eager["latent"]) <= EXACT_TOL
    assert "conv_prepack" in optim.levels.passes_for_level(2)
    assert "conv_prepack" not in optim.levels.passes_for_level(1)


def test_fp32_pipelines_are_left_alone_by_default(pipe):
    optim.optimize(pipe, level=0, conv_prepack=True)
    assert pipe.optimization.applied == []
    assert "no bf16" in pipe.optimization.skipped["conv_prepack"]
    assert not any("forward" in c.__dict__ for c in convs(pipe))


def test_skipped_with_the_reason_without_onednn(pipe, monkeypatch):
    monkeypatch.setattr(optim.conv_prepack, "mkldnn_usable", lambda: "this torch build has no oneDNN (mkldnn)")
    optim.optimize(pipe, level=0, conv_prepack={"fp32": True})
    assert pipe.optimization.applied == []
    assert "oneDNN" in pipe.optimization.skipped["conv_prepack"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=2, padding=1), dict(kernel_size=1, padding=0),
                                      dict(groups=2, padding=1)])
def test_packed_conv_matches_conv2d_and_follows_weight_changes(dtype, geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, **{"kernel_size": 3, **geometry}).to(dtype).requires_grad_(False)
    forward = packed_forward(conv)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in ((2, 8, 12, 12), (1, 8, 7, 9)):
        x = torch.randn(*shape).to(dtype)
        assert (forward(x).float() - F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                              conv.groups).float()).abs().max() <= tol
    assert len(forward.packed_cache) == 3  # owner + one packed weight per input shape
    with torch.no_grad():
        conv.weight.mul_(-2)  # an in-place edit (load_state_dict copies the same way): repacked
    assert (forward(x).float() - conv._conv_forward(x, conv.weight, conv.bias).float()).abs().max() <= 2 * tol
    conv.weight = nn.Parameter(torch.randn_like(conv.weight), requires_grad=False)  # replaced storage
    assert (forward(x).float() - conv._conv_forward(x, conv.weight, conv.bias).float()).abs().max() <= 2 * tol


def test_autograd_calls_take_the_plain_convolution():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    forward = packed_forward(conv)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    forward(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    assert forward.packed_cache == {}
