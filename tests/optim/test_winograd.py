"""The winograd pass on a tiny diffusers-built SD pipeline: bf16 results within the precision bound,
every eligible convolution run through the kernel, revert back to what ran before, skip reasons."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from runtime import optim
import runtime
from runtime.kernels.winograd_cpu import cpu_winograd_ready
from runtime.models.resnet import Upsample2D
from runtime.optim.parity import psnr
from runtime.optim.upsample import FoldedUpsampleConv
from runtime.optim.winograd import WinogradPass, WinogradUpsampleConv, winograd_conv_forward
from runtime.optim.undo import entry
from pipeline_fixtures import assert_same_state, pipeline_state as state, quiet_pipeline

needs_kernel = pytest.mark.skipif(
    not optim.hardware.cpu_has_native_bf16() or cpu_winograd_ready() is not None,
    reason=f"needs native bf16 and the kernel: {cpu_winograd_ready()}")
PROMPT = "a red circle on a blue square"


def run(pipe, output_type="np"):
    return pipe(PROMPT, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type=output_type).images


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


@pytest.fixture(scope="module")
def eager(pipe):
    return run(pipe)


def eligible(pipe):
    """The 3x3 stride-1 convolutions of the models text-to-image runs that the pass takes, but those
    of upsamplers (which run through ``conv_2x``)."""
    models = (pipe.unet, pipe.vae.decoder)
    taker = WinogradPass()
    inside = {id(m.conv) for m in upsamplers(pipe)}
    return [m for model in models for m in model.modules()
            if isinstance(m, nn.Conv2d) and taker._takes(m) and id(m) not in inside]


def upsamplers(pipe):
    return [m for model in (pipe.unet, pipe.vae.decoder) for m in model.modules() if isinstance(m, Upsample2D)]


@needs_kernel
@pytest.mark.parametrize("with_prepack", [True, False])
def test_bf16_within_the_precision_bound_and_revert_restores_what_ran_before(pipe, eager, with_prepack,
                                                                              host_without_amx):
    base = dict(precision=True, prepack=with_prepack, upsample=True)
    optim.optimize(pipe, level=0, **base)
    without = run(pipe)
    optim.optimize(pipe, level=0, **base, winograd=True)
    assert "3x3 convolutions run as Winograd" in str(pipe.optimization)
    out = run(pipe)
    convs = eligible(pipe)
    assert convs and all(entry(m, "winograd").winograd_cache for m in convs)  # every one ran through the kernel
    ups = upsamplers(pipe)
    assert len(ups) >= 2 and all(isinstance(m.conv_2x, WinogradUpsampleConv) and m.conv_2x.cache for m in ups)
    assert not np.array_equal(out, without)  # a different rounding: it did run
    assert psnr(out, eager) >= optim.precision.PrecisionPass.psnr_floor_db
    assert psnr(out, without) >= optim.precision.PrecisionPass.psnr_floor_db
    # revert the winograd pass alone: each conv has the forward it had (prepack's or none)
    winograd = next(p for p in pipe.optimization.applied if p.name == "winograd")
    winograd.revert(pipe)
    pipe.optimization.applied.remove(winograd)
    if with_prepack:
        assert all([n for n, _ in m.compute] == ["prepack"] for m in convs)
    else:
        assert not any("forward" in m.__dict__ or m.compute for m in convs)
    assert all(isinstance(m.conv_2x, FoldedUpsampleConv) for m in ups)  # level 0 + upsample: the fold
    assert np.array_equal(run(pipe), without)


@needs_kernel
def test_level2_plans_it_and_revert_is_bit_exact(pipe, eager, host_without_amx):
    before = state(pipe)
    optim.optimize(pipe, level=2, compile=False)
    assert "winograd" in [p.name for p in pipe.optimization.applied]
    assert "winograd" in optim.levels.passes_for_level(1)  # level 1 in fp32, level 2 in bf16
    run(pipe)
    optim.optimize(pipe, level=2, compile=False)  # applying twice reverts first
    run(pipe)
    pipe.optimization.revert()
    assert not any("forward" in m.__dict__ or m.compute for m in eligible(pipe))
    assert all(m.conv_2x is None for m in upsamplers(pipe))
    assert_same_state(state(pipe), before)
    assert np.array_equal(run(pipe), eager)


@needs_kernel
def test_follows_weight_changes_dtype_changes_and_leaves_mixed_calls_to_the_previous_forward():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    conv.forward = winograd_conv_forward(conv, type(conv).forward.__get__(conv))
    x = torch.randn(1, 32, 6, 6).to(torch.bfloat16)
    first = conv(x)
    with torch.no_grad():
        conv.weight.mul_(2)  # in place: the version counter moves, the transformed kernel is rebuilt
        conv.bias.zero_()
    ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), None, padding=1)
    again = conv(x)
    assert not torch.equal(again, first)
    assert (again.double() - ref).abs().max() <= ref.abs().max() * 2.0 ** -6
    conv.float()  # fp32 now: the fp32 kernel, its transformed kernel made afresh
    xf = x.float()
    direct = torch.nn.functional.conv2d(xf, conv.weight, conv.bias, padding=1)
    out = conv(xf)
    assert out.dtype == torch.float32 and conv.forward.winograd_cache["u"].dtype == torch.float32
    assert not torch.equal(out, direct)  # it ran the kernel
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="type"):  # bf16 input to fp32 weights: torch's own error
        conv(x)


@needs_kernel
def test_resnet_blocks_add_their_residual_inside_the_kernel_and_revert(pipe):
    from runtime.models.resnet import ResnetBlock2D

    optim.optimize(pipe, level=0, winograd=True)  # fp32: the fused sum is the eager sum, bit for bit
    blocks = [m for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, ResnetBlock2D)]
    fused = [m for m in blocks if entry(m.conv2, "winograd") is not None]
    assert fused
    assert f"{len(fused)} with their ResNet block's residual add" in pipe.optimization.notes["winograd"]
    block = fused[0]
    impl = entry(block.conv2, "winograd")
    seen = []
    kernel = impl.fp32

    def spy(x, u, bias, residual=None):
        seen.append(residual)
        return kernel(x, u, bias, residual=residual)

    x = torch.randn(2, block.conv1.in_channels, 6, 6)
    temb = torch.randn(2, block.time_emb_proj.in_features) if block.time_emb_proj is not None else None
    with torch.no_grad():
        impl.fp32 = spy
        out = block(x, temb)
        impl.fp32 = kernel
        assert len(seen) == 1 and seen[0] is not None  # the residual went into the kernel
        def add_after(layer, h, rest, add):  # the same chain, the residual added after the kernel
            return rest(h) if add is None else add + rest(h)

        chain = block.conv2.compute
        block.conv2.compute = (("add_after", add_after), *chain)
        assert torch.equal(out, block(x, temb))  # the same sum, bit for bit
        block.conv2.compute = chain
    pipe.optimization.revert()
    assert all(not m.conv2.compute for m in blocks)


@needs_kernel
def test_fp32_pipeline_within_the_exact_bound_and_revert_is_bit_exact(pipe, eager):
    """In fp32 the pass is exact class: final latents within 1e-4 of eager over 10 steps (the issue's
    bound); the upsamplers keep what ran before (no fp32 doubling kernel)."""
    before = state(pipe)
    latents = run(pipe, output_type="latent")
    optim.optimize(pipe, level=0, winograd=True)
    assert [p.name for p in pipe.optimization.applied] == ["winograd"]
    out = run(pipe, output_type="latent")
    convs = [m for m in eligible(pipe) if any(m is u for u in pipe.unet.modules())]  # the VAE did not run
    assert convs and all(entry(m, "winograd").winograd_cache["u"].dtype == torch.float32 for m in convs)
    assert all(m.conv_2x is None for m in upsamplers(pipe))
    assert not torch.equal(out, latents)
    assert (out - latents).abs().max() <= 1e-4
    pipe.optimization.revert()
    assert_same_state(state(pipe), before)
    assert np.array_equal(run(pipe), eager)


def test_machines_without_the_kernel_are_skipped_with_the_reason(pipe, monkeypatch):
    monkeypatch.setattr(optim.winograd, "kernel_ready", lambda dtype: "this CPU has no AVX512-BF16")
    optim.optimize(pipe, level=0, winograd=True)
    assert pipe.optimization.skipped["winograd"] == "this CPU has no AVX512-BF16"
    assert not any("forward" in m.__dict__ or m.compute for m in eligible(pipe))


@needs_kernel
def test_a_channel_mismatch_gets_torchs_error_not_the_kernel():
    conv = nn.Conv2d(32, 32, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    conv.forward = winograd_conv_forward(conv, type(conv).forward.__get__(conv))
    with pytest.raises(RuntimeError, match="expected input.*to have 32 channels"):
        conv(torch.randn(1, 16, 4, 4).to(torch.bfloat16))


@needs_kernel
def test_convolutions_stay_with_onednn_where_it_measures_faster_unless_asked(pipe):
    from runtime.optim import dispatch

    direct_faster = dispatch.fixed_timer({"winograd": 2.0, "direct": 1.0, "fold": 1.0, "nearest+conv": 1.0})
    with dispatch.using(timer=direct_faster):  # as oneDNN's bf16 convolutions on AMX tiles may
        optim.optimize(pipe, level=0, precision=True, upsample=True, winograd=True)
    assert not any(m.compute for m in eligible(pipe) + [u.conv for u in upsamplers(pipe)])
    assert not any(isinstance(u.conv_2x, WinogradUpsampleConv) for u in upsamplers(pipe))
    note = pipe.optimization.notes["winograd"]
    assert note.startswith(f"0 of ") and "direct 1e+03 ms, winograd 2e+03 ms -> direct (measured)" in note
    assert "fold 1e+03 ms, winograd 2e+03 ms -> fold (measured)" in note
    optim.optimize(pipe, level=0, precision=True, winograd={"amx": True})  # forced: taken without measuring
    assert [p.name for p in pipe.optimization.applied] == ["precision", "winograd"]
    assert all(entry(m, "winograd") is not None for m in eligible(pipe))
    assert "(forced; amx=True)" in pipe.optimization.notes["winograd"]
    pipe.optimization.revert()
