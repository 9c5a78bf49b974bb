"""Memory controls with diffusers' names, against diffusers 0.42.1 on the tiny random SD pipeline:
attention slicing, VAE slicing and tiling (and their deprecated pipeline aliases), CPU offload
(the CPU-only error, and the hooks on a faked accelerator), and offload composed with optimize."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_fixtures import PROMPT, generator

import runtime
from runtime.models.errors import InputError
from runtime.pipelines import offload as offload_mod

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2


@pytest.fixture(scope="module")
def pipes(sd_folder):
    import diffusers

    ours = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    ours.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    return np.asarray(pipe(PROMPT, generator=generator(0), **kwargs).images)


def assert_rel(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    budget = rel * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= budget, f"max|ours - ref| = {err:.3g} > {budget:.3g}"


# ---- attention slicing ------------------------------------------------------------------------

def _sliced_sizes(model) -> dict:
    """name -> slice size of every attention module (None: not sliced), ours or diffusers'."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "set_attention_slice") and hasattr(m, "sliceable_head_dim"):
            if hasattr(m, "processor"):
                out[name] = getattr(m.processor, "slice_size", None)
            else:
                out[name] = m.slice_size
    return out


@pytest.mark.parametrize("slice_size", ["auto", "max", 1, 3, 4, [1, 2, 3, 4, 2, 1, 1, 3, 4, 2, 1, 2]])
def test_attention_slicing_matches_diffusers(pipes, slice_size):
    ours, ref = pipes
    n = len(_sliced_sizes(ref.unet))
    if isinstance(slice_size, list):
        assert len(slice_size) == n  # the tiny UNet's attention modules
    for pipe in pipes:
        pipe.enable_attention_slicing(slice_size)
    try:
        assert _sliced_sizes(ours.unet) == _sliced_sizes(ref.unet)
        assert all(v is not None for v in _sliced_sizes(ours.unet).values())
        mine, theirs = run(ours, output_type="latent"), run(ref, output_type="latent")
    finally:
        for pipe in pipes:
            pipe.disable_attention_slicing()
    assert_rel(mine, theirs)
    assert all(v is None for v in _sliced_sizes(ours.unet).values())
    assert_rel(mine, run(ours, output_type="latent"))  # slicing does not change the function


def test_unet_set_attention_slice_errors_like_diffusers(pipes):
    ours, ref = pipes
    for bad in (5, [1, 2]):  # 5 > the 4 heads of every attention module; a list of the wrong length
        with pytest.raises(ValueError) as theirs:
            ref.unet.set_attention_slice(bad)
        with pytest.raises(ValueError) as mine:
            ours.unet.set_attention_slice(bad)
        assert str(mine.value).split(" ")[0] == str(theirs.value).split(" ")[0]
    with pytest.raises(ValueError, match="smaller or equal to 4"):
        ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.set_attention_slice(5)
    assert all(v is None for v in _sliced_sizes(ours.unet).values())  # nothing half-applied
    ref.unet.set_attention_slice(None)


def test_sliced_attention_goes_through_the_backend_slot(pipes):
    ours, _ = pipes
    calls = []
    attn = ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    previous = attn.backend

    def counting(q, k, v, mask=None):
        calls.append(q.shape)
        return previous(q, k, v, mask)

    attn.backend = counting
    attn.set_attention_slice(1)
    try:
        x = torch.randn(2, 16, attn.to_q.in_features)
        with torch.no_grad():
            attn(x)
    finally:
        attn.set_attention_slice(None)
        attn.backend = previous
    assert len(calls) == 2 * attn.heads and all(s[:2] == (1, 1) for s in calls)


def test_sliced_attention_with_a_mask_equals_unsliced():
    from runtime.models.attention import sdpa_backend
    from runtime.models.attention_slicing import sliced_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    mask = torch.randn(2, 1, 1, 7)
    want = sdpa_backend(q, k, v, mask)
    for size in (1, 3, 8):
        assert torch.allclose(sliced_attention(sdpa_backend, q, k, v, mask, size), want, atol=1e-6)


def test_attention_slicing_survives_optimize(pipes):
    """optimize's attention pass replaces backends; slicing is the module's and stays."""
    ours, _ = pipes
    eager = run(ours, output_type="latent")
    ours.enable_attention_slicing("max")
    try:
        runtime.optimize(ours, level=1)
        assert all(v == 1 for v in _sliced_sizes(ours.unet).values())
        assert_rel(run(ours, output_type="latent"), eager, rel=1e-4)
        ours.optimization.revert()
        assert all(v == 1 for v in _sliced_sizes(ours.unet).values())
    finally:
        if getattr(ours, "optimization", None) is not None:
            ours.optimization.revert()
        ours.disable_attention_slicing()


# ---- VAE slicing and tiling at the pipeline ------------------------------------------------------

@pytest.mark.parametrize("control", ["tiling", "slicing", "both"])
def test_vae_controls_match_diffusers(pipes, control):
    ours, ref = pipes
    size = 48  # latents 24 x 24 against 8-latent tiles: 4 x 4 tiles
    kwargs = {"height": size, "width": size, "num_images_per_prompt": 2 if control != "tiling" else 1}
    for pipe in pipes:
        if control in ("tiling", "both"):
            pipe.vae.enable_tiling()
        if control in ("slicing", "both"):
            pipe.vae.enable_slicing()
    try:
        mine, theirs = run(ours, **kwargs), run(ref, **kwargs)
    finally:
        for pipe in pipes:
            pipe.vae.disable_tiling()
            pipe.vae.disable_slicing()
    assert_rel(mine, theirs)
    if control != "slicing":
        assert float(np.abs(mine - run(ours, **kwargs)).max()) > 1e-4  # tiled differs from untiled


def test_deprecated_pipeline_aliases(pipes):
    ours, _ = pipes
    for name, attr, value in (("enable_vae_slicing", "use_slicing", True), ("disable_vae_slicing", "use_slicing", False),
                              ("enable_vae_tiling", "use_tiling", True), ("disable_vae_tiling", "use_tiling", False)):
        with pytest.warns(FutureWarning, match=name):
            getattr(ours, name)()
        assert getattr(ours.vae, attr) is value


def test_fp16_upcast_copy_follows_the_vae_settings(pipes):
    from runtime.pipelines.vae_codec import working_vae

    ours, _ = pipes
    vae = ours.vae
    half = type(vae).from_config(dict(vae.config, force_upcast=True)).to(torch.float16)
    half.enable_tiling()
    copy = working_vae(ours, half)
    assert copy is not half and copy.dtype == torch.float32 and copy.use_tiling
    half.disable_tiling()
    assert not working_vae(ours, half).use_tiling
    ours.__dict__.pop("_fp32_vae", None)


def test_memory_estimate_counts_one_tile():
    from runtime.pipelines.checks import generation_bytes

    common = dict(images=2, height=1024, width=1024, factor=8, latent_channels=4,
                  vae_block_out_channels=(128, 256, 512, 512), vae_itemsize=4, decode=True)
    _, full, _ = generation_bytes(**common)
    _, tiled, basis = generation_bytes(**common, decode_images=1, decode_size=(512, 512))
    assert tiled < full / 4 and "per slice / tile" in basis


# ---- CPU offload -----------------------------------------------------------------------------------

def _diffusers_message(method: str) -> str:
    import diffusers

    source = (Path(diffusers.__file__).parent / "pipelines" / "pipeline_utils.py").read_text()
    found = re.search(rf'"`{method}` requires accelerator, but not found"', source)
    assert found, "diffusers' message changed"
    return found.group(0).strip('"')


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
@pytest.mark.parametrize("method", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_offload_without_accelerator_raises_diffusers_error(pipes, method, monkeypatch):
    ours, ref = pipes
    monkeypatch.setattr(offload_mod, "accelerator_device", lambda: "cpu")
    with pytest.raises(RuntimeError) as mine:
        getattr(ours, method)()
    assert str(mine.value) == _diffusers_message(method)
    with pytest.raises(RuntimeError, match="requires accelerator"):
        getattr(ours, method)(device="cpu")
    try:  # diffusers itself raises this where accelerate is installed (ImportError without it)
        getattr(ref, method)()
    except RuntimeError as theirs:
        assert str(theirs) == str(mine.value)
    except ImportError:
        pass
    assert ours.__dict__.get("_offload") is None and ours._execution_device.type == "cpu"


def test_offload_device_rules():
    with pytest.raises(ValueError, match="both `gpu_id`"):
        offload_mod.resolve_device("enable_model_cpu_offload", 1, "cuda:0", None)
    assert offload_mod.resolve_device("m", None, "cuda", None) == (torch.device("cuda:0"), 0)
    assert offload_mod.resolve_device("m", 1, "cuda", None) == (torch.device("cuda:1"), 1)
    assert offload_mod.resolve_device("m", None, "cuda", 2) == (torch.device("cuda:2"), 2)


@pytest.fixture
def fresh(sd_folder):
    pipe = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.remove_all_hooks()
    if getattr(pipe, "optimization", None) is not None:
        pipe.optimization.revert()


def _record_onloads(monkeypatch, pipe):
    names = {id(m): n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    seen = []
    real = offload_mod.ModelOffload.onload

    def onload(self, module):
        if not seen or seen[-1] != names.get(id(module), "?"):
            seen.append(names.get(id(module), "?"))
        return real(self, module)

    monkeypatch.setattr(offload_mod.ModelOffload, "onload", onload)
    return seen


def test_model_offload_hooks_on_a_faked_accelerator(fresh, monkeypatch):
    """The 'accelerator' is the CPU itself: the hooks' order and the image are what is checked."""
    want = run(fresh)
    seen = _record_onloads(monkeypatch, fresh)
    offload_mod.enable(fresh, "model", _allow_device="cpu")
    got = run(fresh)
    np.testing.assert_array_equal(got, want)
    assert seen == ["text_encoder", "unet", "vae"]
    assert fresh._offload.current is None  # maybe_free_model_hooks: everything back at rest
    seen.clear()
    with torch.no_grad():  # a direct call, as a custom loop makes it, goes through the hook
        fresh.unet(torch.randn(1, 4, 8, 8), 1, encoder_hidden_states=torch.randn(1, 77, 32))
    assert seen == ["unet"]
    fresh.remove_all_hooks()
    assert fresh.vae._offload_hook is None and not fresh.unet._forward_pre_hooks


def test_sequential_offload_hooks_on_a_faked_accelerator(fresh):
    want = run(fresh)
    offload_mod.enable(fresh, "sequential", _allow_device="cpu")
    hooked = fresh._offload._hooked
    assert any(isinstance(m, torch.nn.Conv2d) for m, _ in hooked.values())
    np.testing.assert_array_equal(run(fresh), want)
    fresh.remove_all_hooks()
    assert not any(m._forward_pre_hooks for m in fresh.unet.modules())


@pytest.mark.parametrize("kind", ["model", "sequential"])
@pytest.mark.parametrize("order", ["optimize-first", "offload-first"])
def test_offload_composes_with_optimize(fresh, kind, order):
    runtime.optimize(fresh, level=1)
    want = run(fresh)
    fresh.optimization.revert()
    eager = run(fresh)
    if order == "optimize-first":
        runtime.optimize(fresh, level=1)
        offload_mod.enable(fresh, kind, _allow_device="cpu")
    else:
        offload_mod.enable(fresh, kind, _allow_device="cpu")
        runtime.optimize(fresh, level=1)
    assert fresh.optimization.applied  # the passes ran on the offloaded pipeline
    np.testing.assert_allclose(run(fresh), want, atol=1e-5)
    fresh.optimization.revert()  # the passes' revert leaves the hooks working
    np.testing.assert_allclose(run(fresh), eager, atol=1e-6)


def test_optimize_sees_the_offload_device(fresh):
    from runtime.optim.components import pipeline_device

    offload_mod.enable(fresh, "model", _allow_device="cpu")
    fresh.__dict__["_offload_device"] = torch.device("cuda:0")  # as enable would set on a GPU machine
    assert pipeline_device(fresh) == torch.device("cuda:0")
    assert fresh._execution_device == torch.device("cuda:0")


def test_sequential_offload_refuses_compiled_modules(fresh):
    fresh.unet.call_with = lambda *a, **k: None  # what optimize's compile pass leaves
    try:
        with pytest.raises(InputError, match="compile"):
            offload_mod.enable(fresh, "sequential", _allow_device="cpu")
    finally:
        del fresh.unet.call_with
