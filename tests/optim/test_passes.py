"""optimize() and every pass on a tiny diffusers-built SD pipeline: parity, neutral settings,
documented bounds, lifecycle (revert bit-exact, twice-safe, skipped with a reason)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime import optim
import runtime
from runtime.models.errors import OptimizationError
from runtime.models.transformer_2d import geglu_activation
from runtime.optim.prepack import onednn_bf16, packed_conv_forward, packed_linear_forward
from runtime.optim.undo import entry
from runtime.optim.parity import max_abs, psnr
from pipeline_fixtures import assert_same_state, pipeline_state as state, quiet_pipeline

STEPS = 10
PROMPT = "a red circle on a blue square"
EXACT_TOL = 1e-4  # fp32 max-abs on final latents over a 10-step run (issue 4)
# Settings that make the tiny test UNet (attention only at the 2x-downsampled level) merge tokens.
TOME_ON = {"max_downsample": 2}


def run(pipe, output_type="np", seed=0, steps=STEPS, **kw):
    out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type=output_type, **kw).images
    return out


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


@pytest.fixture(scope="module")
def eager(pipe):
    return {"np": run(pipe), "latent": run(pipe, "latent")}


# ---- level 0 and the exact passes ---------------------------------------------------------------
def test_level0_changes_nothing(pipe, eager):
    optim.optimize(pipe, level=0)
    assert pipe.optimization.applied == [] and pipe.optimization.skipped == {}
    assert np.array_equal(run(pipe), eager["np"])


def upsamplers(pipe):
    from runtime.models.resnet import Upsample2D

    return [m for model in (pipe.unet, pipe.vae) for m in model.modules() if isinstance(m, Upsample2D)]


@pytest.mark.parametrize("name, settings, proof", [
    ("attention", {"backend": "sdpa"}, lambda p: all(a.backend is not None for a in p.unet.attention_modules())),
    ("fused_qkv", {}, lambda p: all(a.fused in ("qkv", "kv") for a in p.unet.attention_modules())),
    ("memory_format", {"channels_last": "on"},
     lambda p: p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)),
    ("upsample", {}, lambda p: len(ups := upsamplers(p)) >= 2 and all(m.conv_2x is not None for m in ups)),
])
def test_exact_pass_matches_eager(pipe, eager, name, settings, proof):
    optim.optimize(pipe, level=0, **{name: settings})
    assert [p.name for p in pipe.optimization.applied] == [name]
    assert proof(pipe)
    assert max_abs(run(pipe, "latent"), eager["latent"]) <= EXACT_TOL


def test_level1_is_exact(pipe, eager):
    optim.optimize(pipe, level=1)
    assert {p.name for p in pipe.optimization.applied} >= {"attention", "fused_qkv", "upsample"}
    assert "memory_format" in pipe.optimization.skipped  # measured no faster on CPU: says why
    assert max_abs(run(pipe, "latent"), eager["latent"]) <= EXACT_TOL


def _fused_slots():
    """(pass, module class, slot, fused callable, eager callable, kernel readiness) per fusing pass."""
    from runtime.kernels.geglu_cpu import cpu_geglu_ready
    from runtime.kernels.group_norm_cpu import cpu_group_norm_ready
    from runtime.models.resnet import ResnetBlock2D, group_norm_silu
    from runtime.models.transformer_2d import GEGLU, geglu_activation
    from runtime.optim.geglu import cpu_geglu_activation
    from runtime.optim.group_norm import cpu_group_norm_silu_step

    return {"geglu": (GEGLU, "activation", cpu_geglu_activation, geglu_activation, cpu_geglu_ready),
            "group_norm": (ResnetBlock2D, "norm_silu", cpu_group_norm_silu_step, group_norm_silu, cpu_group_norm_ready)}


@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("name", ["geglu", "group_norm"])
def test_fused_kernel_in_bf16_within_the_precision_bound_and_reverts(pipe, eager, name):
    cls, slot, fused, plain, ready = _fused_slots()[name]
    if ready() is not None:
        pytest.skip(ready())
    base = dict(precision=True, prepack=True)  # packed convolutions return channels-last tensors
    optim.optimize(pipe, level=0, **base)
    without = run(pipe)
    optim.optimize(pipe, level=0, **base, **{name: True})
    modules = [m for m in pipe.unet.modules() if isinstance(m, cls)]
    assert modules and all(getattr(m, slot) is fused for m in modules)
    out = run(pipe)
    assert psnr(out, eager["np"]) >= optim.precision.PrecisionPass.psnr_floor_db
    assert psnr(out, without) >= optim.precision.PrecisionPass.psnr_floor_db
    pipe.optimization.revert()
    assert all(getattr(m, slot) is plain for m in modules)
    assert np.array_equal(run(pipe), eager["np"])


@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_geglu_fuses_the_projection_for_bf16_calls_and_reverts(pipe, host_without_amx):
    from runtime.kernels.linear_geglu_cpu import cpu_linear_geglu_ready
    from runtime.models.transformer_2d import GEGLU

    if cpu_linear_geglu_ready() is not None:
        pytest.skip(cpu_linear_geglu_ready())
    optim.optimize(pipe, level=0, precision=True, geglu=True)
    modules = [m for m in pipe.unet.modules() if isinstance(m, GEGLU)]
    assert modules and all(m.fused is not None for m in modules)
    assert f"{len(modules)} of {len(modules)} GEGLU projections fused with their activation" in pipe.optimization.notes["geglu"]
    module = modules[0]
    x = torch.randn(2, 9, module.proj.in_features).to(torch.bfloat16)
    with torch.inference_mode():
        fused = module(x)
        unfused = module.activation(module.proj(x))
        exact = geglu_activation(F.linear(x.double(), module.proj.weight.double(), module.proj.bias.double()))
        assert module.fused(x.double()) is None  # another dtype: the module runs the projection, then the activation
    assert fused.dtype == torch.bfloat16
    assert (fused.double() - exact).abs().max() <= (unfused.double() - exact).abs().max()
    pipe.optimization.revert()
    assert all(m.fused is None for m in modules)


@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_geglu_leaves_the_projection_to_onednn_where_it_measures_faster_unless_asked(pipe):
    from runtime.kernels.linear_geglu_cpu import cpu_linear_geglu_ready
    from runtime.models.transformer_2d import GEGLU
    from runtime.optim import dispatch

    if cpu_linear_geglu_ready() is not None:
        pytest.skip(cpu_linear_geglu_ready())
    with dispatch.using(timer=dispatch.fixed_timer({"fused": 2.0, "unfused": 1.0})):  # as oneDNN on AMX tiles may
        optim.optimize(pipe, level=0, precision=True, geglu=True)
    modules = [m for m in pipe.unet.modules() if isinstance(m, GEGLU)]
    assert all(m.fused is None and m.activation is not geglu_activation for m in modules)  # the activation kernel stays
    assert f"0 of {len(modules)} GEGLU projections fused" in pipe.optimization.notes["geglu"]
    assert "unfused 1e+03 ms, fused 2e+03 ms -> unfused (measured)" in pipe.optimization.notes["geglu"]
    optim.optimize(pipe, level=0, precision=True, geglu={"amx": True})  # forced: fused without measuring
    assert all(m.fused is not None for m in modules) and "(forced; amx=True)" in pipe.optimization.notes["geglu"]
    pipe.optimization.revert()


def test_geglu_on_a_cpu_without_bf16_fuses_fp32_calls_within_the_exact_bound(pipe, eager, fake_cpu):
    from runtime.kernels.linear_geglu_cpu import cpu_linear_geglu_ready
    from runtime.models.transformer_2d import GEGLU

    if cpu_linear_geglu_ready(torch.float32) is not None:
        pytest.skip(cpu_linear_geglu_ready(torch.float32))
    fake_cpu("avx512")  # Skylake-SP / Cascade Lake: AVX-512 without its bf16 extension
    optim.optimize(pipe, level=0, geglu=True)
    assert [p.name for p in pipe.optimization.applied] == ["geglu"]
    modules = [m for m in pipe.unet.modules() if isinstance(m, GEGLU)]
    assert all(m.fused is not None and m.activation is geglu_activation for m in modules)
    out = run(pipe, "latent")
    assert not torch.equal(out, eager["latent"]) and max_abs(out, eager["latent"]) <= EXACT_TOL
    pipe.optimization.revert()
    assert all(m.fused is None for m in modules)


def test_attention_backend_choice_needs_cuda_for_triton():
    from runtime.optim.attention import choose_backend

    with pytest.raises(OptimizationError, match="needs a CUDA device"):
        choose_backend("triton", torch.device("cpu"))


# ---- precision ----------------------------------------------------------------------------------
@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_precision_bf16_within_bound(pipe, eager):
    before = state(pipe)
    optim.optimize(pipe, level=0, precision=True)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    out = run(pipe)
    assert out.dtype == eager["np"].dtype and np.isfinite(out).all()
    assert psnr(out, eager["np"]) >= optim.precision.PrecisionPass.psnr_floor_db
    pipe.optimization.revert()
    assert_same_state(state(pipe), before)
    assert np.array_equal(run(pipe), eager["np"])


def test_precision_skipped_without_native_bf16(pipe, fake_cpu):
    fake_cpu("avx512")
    optim.optimize(pipe, level=0, precision=True)
    assert pipe.optimization.applied == []
    assert "bf16" in pipe.optimization.skipped["precision"]


# ---- approximate passes: neutral, bounded, visible --------------------------------------------
NEUTRAL = {"deepcache": {"interval": 1}, "tome": {"ratio": 0.0, **TOME_ON}, "tgate": {"gate_step": STEPS}}
DEFAULT = {"deepcache": {}, "tome": TOME_ON, "tgate": {}}


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_approximate_neutral_setting_is_exact(pipe, eager, name):
    optim.optimize(pipe, level=0, **{name: NEUTRAL[name]})
    assert [p.name for p in pipe.optimization.applied] == [name]
    assert np.array_equal(run(pipe), eager["np"])


@pytest.mark.parametrize("name", sorted(DEFAULT))
def test_approximate_default_is_bounded_and_changes_output(pipe, eager, name):
    optim.optimize(pipe, level=0, **{name: DEFAULT[name]})
    out = run(pipe)
    floor = optim.PASSES[name].psnr_floor_db
    assert not np.array_equal(out, eager["np"]), f"{name} at its default setting did not change the output"
    assert psnr(out, eager["np"]) >= floor


def test_tgate_fraction_and_absolute_steps_agree(pipe):
    optim.optimize(pipe, level=0, tgate={"gate_step": 0.5})
    by_fraction = run(pipe)
    optim.optimize(pipe, level=0, tgate={"gate_step": STEPS // 2})
    assert np.array_equal(run(pipe), by_fraction)


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler"])
def test_deepcache_with_multistep_schedulers(pipe, scheduler):
    original = pipe.scheduler
    pipe.scheduler = runtime.SCHEDULER_CLASSES[scheduler].from_config(original.config)
    try:
        ref = run(pipe, steps=6)
        optim.optimize(pipe, level=0, deepcache={"interval": 1})
        assert np.array_equal(run(pipe, steps=6), ref)
        optim.optimize(pipe, level=0, deepcache={"interval": 2})
        out = run(pipe, steps=6)
        assert not np.array_equal(out, ref) and np.isfinite(out).all()
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("branch, layer", [(0, None), (0, 0), (0, 1), (1, 0), (1, -1)])
def test_deepcache_cuts_are_neutral_at_interval_1_and_differ_from_the_default(pipe, eager, branch, layer):
    optim.optimize(pipe, level=0, deepcache={"interval": 1, "branch": branch, "layer": layer})
    assert np.array_equal(run(pipe), eager["np"])
    optim.optimize(pipe, level=0, deepcache={})
    default = run(pipe)
    optim.optimize(pipe, level=0, deepcache={"branch": branch, "layer": layer})
    out = run(pipe)
    assert not np.array_equal(out, default) and not np.array_equal(out, eager["np"])
    assert psnr(out, eager["np"]) >= optim.PASSES["deepcache"].psnr_floor_db


def test_deepcache_start_runs_the_early_steps_whole(pipe, eager):
    # Caching that would begin only at the last step never reuses anything: eager exactly.
    optim.optimize(pipe, level=0, deepcache={"interval": 2, "start": STEPS - 1})
    assert np.array_equal(run(pipe), eager["np"])
    optim.optimize(pipe, level=0, deepcache={"interval": 2, "start": STEPS // 2})
    late = run(pipe)
    optim.optimize(pipe, level=0, deepcache={"interval": 2, "start": 0})
    early = run(pipe)
    assert not np.array_equal(late, eager["np"]) and not np.array_equal(late, early)
    assert psnr(late, eager["np"]) > psnr(early, eager["np"])  # fewer reused steps, closer to eager
    optim.optimize(pipe, level=0, deepcache={"interval": 2, "start": 0.5})  # a fraction of the steps
    assert np.array_equal(run(pipe), late)


def test_deepcache_auto_interval_follows_the_step_count(pipe):
    from runtime.optim.deepcache import AUTO_LONG, resolve_interval

    assert resolve_interval(None, AUTO_LONG) == 3 and resolve_interval(None, AUTO_LONG - 1) == 2
    assert resolve_interval(4, 10) == 4
    optim.optimize(pipe, level=0, deepcache={"interval": None})
    auto = run(pipe)
    optim.optimize(pipe, level=0, deepcache={"interval": 2})  # STEPS < AUTO_LONG
    assert np.array_equal(run(pipe), auto)


def test_deepcache_layer_out_of_range_is_skipped_with_reason(pipe):
    optim.optimize(pipe, level=0, deepcache={"layer": 7})
    assert "layer 7 is out of range" in pipe.optimization.skipped["deepcache"]


def test_deepcache_with_img2img(pipe):
    from pipeline_fixtures import test_image

    img2img = runtime.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    image, _ = test_image(size=16)
    kwargs = dict(image=image, strength=0.8)
    ref = run(img2img, **kwargs)
    optim.optimize(img2img, level=0, deepcache={"interval": 1})
    assert np.array_equal(run(img2img, **kwargs), ref)
    optim.optimize(img2img, level=0, deepcache={"interval": 3})
    assert not np.array_equal(run(img2img, **kwargs), ref)
    img2img.optimization.revert()


# ---- lifecycle -------------------------------------------------------------------------------
ALL_ON = {"attention": {}, "fused_qkv": {}, "memory_format": {"channels_last": "on"}, "precision": {}, "upsample": {},
          "tome": TOME_ON, "tgate": {}, "deepcache": {}}


@pytest.mark.parametrize("name", sorted(ALL_ON))
def test_revert_is_bit_exact(pipe, eager, name):
    before = state(pipe)
    optim.optimize(pipe, level=0, **{name: ALL_ON[name]})
    pipe.optimization.revert()
    assert pipe.optimization is None
    assert_same_state(state(pipe), before)
    assert np.array_equal(run(pipe), eager["np"])


def test_applying_twice_is_safe_and_reverts_first(pipe, eager):
    optim.optimize(pipe, level=3, compile=False, **{"tome": TOME_ON})
    first = run(pipe)
    optim.optimize(pipe, level=3, compile=False, **{"tome": TOME_ON})
    assert np.array_equal(run(pipe), first)
    assert all(getattr(a, "fused", None) for a in pipe.unet.attention_modules())
    optim.optimize(pipe, level=0)
    assert np.array_equal(run(pipe), eager["np"])


def test_report_says_what_was_done(pipe):
    optim.optimize(pipe, level=3, compile=False, deepcache={"interval": 2})
    report = pipe.optimization.as_dict()
    assert report["applied"]["deepcache"] == {"interval": 2, "branch": 0, "layer": -1, "start": 0.25}
    assert "memory_format" in report["skipped"]
    text = str(pipe.optimization)
    assert "applied deepcache(interval=2, branch=0, layer=-1, start=0.25)" in text and "skipped memory_format" in text


def test_unsupported_pipeline_is_skipped_with_reason(ddpm_folder, one_thread):
    pipe = runtime.DDPMPipeline.from_pretrained(str(ddpm_folder))
    optim.optimize(pipe, level=3, compile=False)
    skipped = pipe.optimization.skipped
    assert "cross-attention" in skipped["tgate"]
    assert "feature_cache" in skipped["deepcache"]
    assert "token_merge" in skipped["tome"]
    pipe.optimization.revert()


def test_bad_overrides_name_the_valid_choices(pipe):
    with pytest.raises(OptimizationError, match="unknown pass 'tomee'.*valid passes: .*tome"):
        optim.optimize(pipe, level=3, tomee=False)
    with pytest.raises(OptimizationError, match="unknown settings intervals; valid: interval, branch"):
        optim.optimize(pipe, level=3, deepcache={"intervals": 2})
    with pytest.raises(OptimizationError, match="level must be one of"):
        optim.optimize(pipe, level=7)
    with pytest.raises(OptimizationError, match="ratio must be in"):
        optim.optimize(pipe, level=0, tome={"ratio": 1.5})
    with pytest.raises(OptimizationError, match="start must be a step index >= 0 or a fraction in"):
        optim.optimize(pipe, level=0, deepcache={"start": 1.5})
    assert getattr(pipe, "optimization", None) is None  # nothing was applied


def test_runtime_reexports_optimize(pipe):
    assert runtime.optimize is optim.optimize
    assert runtime.optimize(pipe, level=0) is pipe


def test_level3_concurrent_calls_match_sequential(pipe):
    optim.optimize(pipe, level=3, compile=False, precision=False, **{"tome": TOME_ON})
    seeds = [0, 1, 2, 3]
    sequential = [run(pipe, seed=s, steps=6) for s in seeds]
    results = [None] * len(seeds)

    def work(i):
        results[i] = run(pipe, seed=seeds[i], steps=6)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert np.array_equal(got, want)


# ---- prepack: oneDNN convolutions and linears with weights packed once --------------------------------
def convs(pipe):
    return [c for m in optim.components.pipeline_models(pipe).values() for c in m.modules() if isinstance(c, nn.Conv2d)]


def used_packable(pipe):
    """The convolutions and linears text-to-image runs (the VAE encoder's do not)."""
    models = (pipe.unet, pipe.vae.decoder, pipe.vae.post_quant_conv, pipe.text_encoder)
    return [c for m in models for c in m.modules() if isinstance(c, (nn.Conv2d, nn.Linear))]


def test_fp32_matches_eager_and_revert_is_exact(pipe, eager):
    before = state(pipe)
    optim.optimize(pipe, level=0, prepack={"fp32": True})
    assert [p.name for p in pipe.optimization.applied] == ["prepack"]
    assert "linears packed for oneDNN" in str(pipe.optimization)
    assert max_abs(run(pipe, "latent"), eager["latent"]) <= EXACT_TOL
    assert np.abs(run(pipe) - eager["np"]).max() <= 1e-4  # the decode too
    assert all(entry(c, "prepack").packed_cache for c in used_packable(pipe))  # every convolution and linear ran packed
    pipe.optimization.revert()
    assert not any("forward" in c.__dict__ or c.compute for c in used_packable(pipe))
    assert_same_state(state(pipe), before)
    assert np.array_equal(run(pipe), eager["np"])


@pytest.mark.skipif(not optim.hardware.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_with_precision_stays_within_the_precision_bound(pipe, eager):
    optim.optimize(pipe, level=0, precision=True)
    precision_only = run(pipe)
    optim.optimize(pipe, level=0, precision=True, prepack=True)
    assert any(c.weight.dtype == torch.bfloat16 for c in convs(pipe))
    out = run(pipe)
    assert all(entry(c, "prepack").packed_cache for c in used_packable(pipe))
    assert psnr(out, eager["np"]) >= optim.precision.PrecisionPass.psnr_floor_db
    assert psnr(out, precision_only) >= optim.precision.PrecisionPass.psnr_floor_db


def test_applying_twice_is_safe_and_level2_plans_it(pipe, eager):
    optim.optimize(pipe, level=0, prepack={"fp32": True})
    optim.optimize(pipe, level=0, prepack={"fp32": True})  # reverts first
    assert max_abs(run(pipe, "latent"), eager["latent"]) <= EXACT_TOL
    assert "prepack" in optim.levels.passes_for_level(2)
    assert "prepack" not in optim.levels.passes_for_level(1)


def test_fp32_pipelines_are_left_alone_by_default(pipe):
    optim.optimize(pipe, level=0, prepack=True)
    assert pipe.optimization.applied == []
    assert "no bf16" in pipe.optimization.skipped["prepack"]
    assert not any("forward" in c.__dict__ or c.compute for c in used_packable(pipe))


def test_skipped_with_the_reason_without_onednn(pipe, monkeypatch):
    monkeypatch.setattr(optim.prepack, "mkldnn_usable", lambda: "this torch build has no oneDNN (mkldnn)")
    optim.optimize(pipe, level=0, prepack={"fp32": True})
    assert pipe.optimization.applied == []
    assert "oneDNN" in pipe.optimization.skipped["prepack"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=2, padding=1), dict(kernel_size=1, padding=0),
                                      dict(groups=2, padding=1)])
def test_packed_conv_matches_conv2d_and_follows_weight_changes(dtype, geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, **{"kernel_size": 3, **geometry}).to(dtype).requires_grad_(False)
    forward = packed_conv_forward(conv)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in ((2, 8, 12, 12), (1, 8, 7, 9)):
        x = torch.randn(*shape).to(dtype)
        assert (forward(x).float() - F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                              conv.groups).float()).abs().max() <= tol
    packs = dtype == torch.float32 or onednn_bf16()  # bf16 stays on the plain conv where oneDNN has no bf16 path
    assert len(forward.packed_cache) == (3 if packs else 0)  # owner + one packed weight per input shape
    with torch.no_grad():
        conv.weight.mul_(-2)  # an in-place edit (load_state_dict copies the same way): repacked
    assert (forward(x).float() - conv._conv_forward(x, conv.weight, conv.bias).float()).abs().max() <= 2 * tol
    conv.weight = nn.Parameter(torch.randn_like(conv.weight), requires_grad=False)  # replaced storage
    assert (forward(x).float() - conv._conv_forward(x, conv.weight, conv.bias).float()).abs().max() <= 2 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear_and_follows_weight_changes(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=bias).to(dtype).requires_grad_(False)
    forward = packed_linear_forward(linear)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    inputs = [torch.randn(2, 33, 48), torch.randn(5, 48), torch.randn(2, 48, 7).transpose(1, 2)]  # 3-D, 2-D, strided
    for x in (t.to(dtype) for t in inputs):
        assert (forward(x).float() - F.linear(x, linear.weight, linear.bias).float()).abs().max() <= tol
    packs = dtype == torch.float32 or onednn_bf16()  # bf16 stays on F.linear where oneDNN has no bf16 path
    assert set(forward.packed_cache) == ({"owner", "packed"} if packs else set())  # one for every row count
    with torch.no_grad():
        linear.weight.mul_(-2)
    assert (forward(x).float() - F.linear(x, linear.weight, linear.bias).float()).abs().max() <= 2 * tol


@pytest.mark.parametrize("make", [lambda: (nn.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 6, 6, requires_grad=True)),
                                  lambda: (nn.Linear(4, 4), torch.randn(3, 4, requires_grad=True))])
def test_autograd_calls_take_the_plain_operator(make):
    module, x = make()
    forward = (packed_conv_forward if isinstance(module, nn.Conv2d) else packed_linear_forward)(module)
    forward(x).sum().backward()
    assert x.grad is not None and module.weight.grad is not None
    assert forward.packed_cache == {}


def test_packed_forwards_take_weights_made_inside_inference_mode():
    with torch.inference_mode():  # e.g. optimize() called inside inference_mode: no version counters
        linear, conv = nn.Linear(8, 8), nn.Conv2d(3, 4, 3, padding=1)
        x, img = torch.randn(2, 8), torch.randn(1, 3, 5, 5)
        assert torch.allclose(packed_linear_forward(linear)(x), linear(x), atol=1e-5)
        assert torch.allclose(packed_conv_forward(conv)(img), conv(img), atol=1e-5)
