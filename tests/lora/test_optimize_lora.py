"""LoRA with ``runtime.optimize``: either order gives eager's images within the level's class, revert stays
bit-exact (and leaves the adapters on), swapping at level 2 repacks no base weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from lora_helpers import latents, ours
from pipeline_fixtures import assert_same_state, pipeline_state
from runtime.optim import precision
from runtime.optim.parity import max_abs, psnr
from runtime.optim.undo import entry as chain_entry

EXACT_TOL = 1e-4  # level 1 (exact class): fp32 max-abs on latents, as tests/optim
STEPS = 3


def images(pipe, **kwargs):
    return latents(pipe, steps=STEPS, output_type="np", **kwargs)


def geglu_kernels_here() -> bool:
    from runtime.kernels.geglu_cpu import cpu_geglu_ready
    from runtime.kernels.linear_geglu_cpu import cpu_linear_geglu_ready

    return cpu_geglu_ready() is None or cpu_linear_geglu_ready(torch.float32) is None


def within_class(level: int, got, expected) -> None:
    if level == 1:
        assert max_abs(got, expected) <= EXACT_TOL * 10  # images in [0, 1]: well inside the latent bound
    else:
        assert psnr(got, expected) >= precision.PrecisionPass.psnr_floor_db


@pytest.fixture(scope="module")
def eager(sd_folder, sd_lora, sd_lora_b):
    """What eager gives with adapters a, b at 0.7 / 0.3: unfused, then fused (the reference images)."""
    pipe = ours(sd_folder)
    base = pipeline_state(pipe)
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    pipe.load_lora_weights(str(sd_lora_b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    unfused = images(pipe)
    pipe.fuse_lora()
    return {"base": base, "unfused": unfused, "fused": images(pipe), "fused_state": pipeline_state(pipe)}


def _load(pipe, sd_lora, sd_lora_b):
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    pipe.load_lora_weights(str(sd_lora_b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("order", ["optimize first", "lora first"])
def test_either_order_matches_eager_and_reverts_exactly(sd_folder, sd_lora, sd_lora_b, eager, level, order):
    pipe = ours(sd_folder)
    if order == "optimize first":
        runtime.optimize(pipe, level=level)
        _load(pipe, sd_lora, sd_lora_b)
    else:
        _load(pipe, sd_lora, sd_lora_b)
        runtime.optimize(pipe, level=level)
    applied = [p.name for p in pipe.optimization.applied]
    assert "fused_qkv" in applied
    assert ("geglu" in applied) == geglu_kernels_here()  # on AVX2-only CPUs no GEGLU kernel runs: skipped
    if level == 2:
        assert "precision" in applied or "precision" in pipe.optimization.skipped
    within_class(level, images(pipe), eager["unfused"])
    pipe.optimization.revert()
    assert np.array_equal(images(pipe), eager["unfused"])  # the adapters stay on, the passes are gone
    assert_same_state(eager["base"], pipeline_state(pipe))  # unfused adapters never touch the weights


@pytest.mark.parametrize("level", [1, 2])
def test_fuse_under_optimization_then_revert_then_unfuse(sd_folder, sd_lora, sd_lora_b, eager, level):
    pipe = ours(sd_folder)
    _load(pipe, sd_lora, sd_lora_b)
    runtime.optimize(pipe, level=level)
    pipe.fuse_lora()  # into the converted (level 2: bf16) weights and the fp32 ones revert puts back
    within_class(level, images(pipe), eager["fused"])
    pipe.optimization.revert()  # leaves the adapters fused
    assert_same_state(eager["fused_state"], pipeline_state(pipe))
    assert np.array_equal(images(pipe), eager["fused"])
    pipe.unfuse_lora()
    assert_same_state(eager["base"], pipeline_state(pipe))
    # and the other way round: fused, optimized (the fused weights converted), unfused, reverted
    pipe.fuse_lora()
    runtime.optimize(pipe, level=level)
    within_class(level, images(pipe), eager["fused"])
    pipe.unfuse_lora()
    within_class(level, images(pipe), eager["unfused"])
    pipe.optimization.revert()
    assert_same_state(eager["base"], pipeline_state(pipe))
    assert np.array_equal(images(pipe), eager["unfused"])


def test_fused_qkv_keeps_its_matmul_and_geglu_adds_the_term_while_an_adapter_is_on(sd_folder, sd_lora):
    from runtime.models.transformer_2d import GEGLU, geglu_activation

    pipe = ours(sd_folder)
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    h = torch.randn(2, 16, attn.to_q.in_features)
    with torch.no_grad():
        separate = attn(h)  # not fused yet: each projection runs its chain (base + adapter)
    runtime.optimize(pipe, level=1)
    geglu = next(m for m in pipe.unet.modules() if isinstance(m, GEGLU))
    assert attn.fused == "qkv" and not attn.to_q.computes_operator() and len(attn.to_q.side_terms()) == 1
    calls = {"qkv": 0, "q": 0}
    hooks = [attn.to_qkv.register_forward_hook(lambda *a: calls.__setitem__("qkv", calls["qkv"] + 1)),
             attn.to_q.register_forward_hook(lambda *a: calls.__setitem__("q", calls["q"] + 1))]
    with torch.no_grad():
        fused = attn(h)
    for hook in hooks:
        hook.remove()
    assert calls == {"qkv": 1, "q": 0}  # one matmul for q/k/v, the adapter's terms added after it
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 4, geglu.proj.in_features)
    if geglu.fused is not None:  # takes the adapter's term inside its sums: what the chain and activation give
        with torch.no_grad():
            with_term = geglu.fused(x)
            torch.testing.assert_close(with_term, geglu_activation(geglu.proj(x)), rtol=1e-5, atol=1e-5)
            pipe.disable_lora()
            base = geglu.fused(x)
            plain = geglu_activation(torch.nn.functional.linear(x, geglu.proj.weight, geglu.proj.bias))
            torch.testing.assert_close(base, plain, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(base, with_term, rtol=1e-4, atol=1e-4)  # the adapter reaches this layer
            pipe.enable_lora()
    pipe.fuse_lora()
    assert attn.to_q.computes_operator()  # fused: the entry is out, the fast paths are back
    assert torch.equal(attn.to_qkv.weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    pipe.optimization.revert()


def _packed(pipe) -> dict:
    """Every prepack entry's cached packed weights, by layer."""
    out = {}
    for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, m in model.named_modules():
            impl = chain_entry(m, "prepack")
            if impl is not None and getattr(impl, "packed_cache", None):
                out[f"{name}.{path}"] = {k: v for k, v in impl.packed_cache.items() if k != "owner"}
    return out


def test_level2_swaps_and_hotswaps_repack_nothing(sd_folder, sd_lora, sd_lora_b):
    pipe = ours(sd_folder)
    pipe.enable_lora_hotswap(target_rank=8)
    _load(pipe, sd_lora, sd_lora_b)
    runtime.optimize(pipe, level=2)
    if "prepack" not in [p.name for p in pipe.optimization.applied]:
        pytest.skip(f"prepack not applied here: {pipe.optimization.skipped.get('prepack') or pipe.optimization.skipped}")
    reference = images(pipe)
    packed = _packed(pipe)
    assert packed, "no packed weights to watch"
    lora_layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    adapters = dict(chain_entry(lora_layer, "lora").packs)  # the adapters' packed pairs, per dtype

    def check(in_place: bool) -> None:
        images(pipe)
        now = _packed(pipe)
        assert now.keys() == packed.keys()
        for layer, cache in packed.items():
            assert all(now[layer][k] is v for k, v in cache.items()), f"{layer} was repacked"
        if in_place:  # fixed-rank buffers: the same tensors, new values
            after = chain_entry(lora_layer, "lora").packs
            assert all(after[k] is v for k, v in adapters.items())

    pipe.set_adapters(["a", "b"], [0.2, 0.9])
    check(in_place=True)
    pipe.load_lora_weights(str(sd_lora_b), adapter_name="a", hotswap=True)
    check(in_place=True)
    assert not np.array_equal(images(pipe), reference)  # "a" holds b's weights now
    pipe.set_adapters("b")  # another set of active adapters: other packs, the base still untouched
    check(in_place=False)
    pipe.optimization.revert()
