"""UNet2DConditionModel against diffusers' on tiny SD1 / SD2 / SDXL / inpainting / LCM configs:
same keys, same numbers, plus the extension points (fused QKV, attention backend, gradient
checkpointing, token-merge hooks, DeepCache's feature cache) and checkpoint interop."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from runtime.models import UNet2DConditionModel  # noqa: E402
from runtime.models.errors import ConfigError, InputError  # noqa: E402
from runtime.models.unet_2d_condition import FeatureCache  # noqa: E402
from tiny_configs import FULL_UNET_CONFIGS, UNET_CONFIGS, build_unet_pair, unet_config, unet_inputs  # noqa: E402

FP32_REL = 1e-5  # fp32 budget, relative to the reference's magnitude (at least 1)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = FP32_REL) -> None:
    assert ours.shape == ref.shape
    budget = rel * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= budget, f"max|ours - ref| = {err:.3g} > {budget:.3g}"


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread than on an oversubscribed shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1_pair():
    return build_unet_pair("sd1")


# ---- parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
@pytest.mark.parametrize("size", [(16, 16), (15, 13)], ids=["even", "odd"])  # odd: forwarded upsample sizes
def test_parity_with_diffusers(name, size):
    ref, ours, config = build_unet_pair(name)
    assert set(ours.state_dict()) == set(ref.state_dict())
    kwargs = unet_inputs(config, height=size[0], width=size[1])
    assert_close(run(ours, **kwargs), run(ref, **kwargs))


_B, _S = 2, 7
VARIANTS = {  # sd1 overrides -> extra forward inputs
    "only_cross_attention": (dict(only_cross_attention=[True, False, False]), {}),
    "scale_shift": (dict(resnet_time_scale_shift="scale_shift"), {}),
    "conv_kernels_1": (dict(conv_in_kernel=1, conv_out_kernel=1), {}),
    "center_input": (dict(center_input_sample=True), {}),
    "time_embedding_dim": (dict(time_embedding_dim=40, time_embedding_act_fn="silu"), {}),
    "no_mid_block": (dict(mid_block_type=None), {}),
    "encoder_hid_proj": (dict(encoder_hid_dim=10), {"encoder_hidden_states": torch.randn(_B, _S, 10)}),
    "class_embeds": (dict(num_class_embeds=5), {"class_labels": torch.tensor([1, 3])}),
    "class_timestep_concat": (dict(class_embed_type="timestep", class_embeddings_concat=True),
                              {"class_labels": torch.tensor([5.0, 50.0])}),
    "class_projection": (dict(class_embed_type="projection", projection_class_embeddings_input_dim=6),
                         {"class_labels": torch.randn(_B, 6)}),
    "per_layer_transformer_depths": (dict(transformer_layers_per_block=[[1, 2], [2, 1], [1, 1]],
                                          reverse_transformer_layers_per_block=[[1, 1, 1], [2, 1, 1], [1, 2, 1]]),
                                     {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_config_variants(variant):
    overrides, extra = VARIANTS[variant]
    ref, ours, config = build_unet_pair("sd1", **overrides)
    assert set(ours.state_dict()) == set(ref.state_dict())
    kwargs = {**unet_inputs(config, batch=_B, seq=_S), **extra}
    assert_close(run(ours, **kwargs), run(ref, **kwargs))


@pytest.mark.parametrize("timestep", [7, 7.5, torch.tensor(7.5), torch.tensor([7]), torch.tensor([3.0, 900.0])],
                         ids=["int", "float", "0d", "1d-one", "1d-batch"])
def test_timestep_forms(sd1_pair, timestep):
    ref, ours, config = sd1_pair
    kwargs = {**unet_inputs(config), "timestep": timestep}
    assert_close(run(ours, **kwargs), run(ref, **kwargs))


def test_encoder_attention_mask(sd1_pair):
    ref, ours, config = sd1_pair
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    kwargs = {**unet_inputs(config), "encoder_attention_mask": mask}
    out = run(ours, **kwargs)
    assert_close(out, run(ref, **kwargs))
    assert not torch.allclose(out, run(ours, **unet_inputs(config)))  # the mask did something


def test_controlnet_residuals(sd1_pair):
    ref, ours, config = sd1_pair
    kwargs = unet_inputs(config)
    g = torch.Generator().manual_seed(3)
    # the skips: conv_in, block 0 (2 resnets + downsampler), block 1 (same), block 2 (2 resnets)
    shapes = [(2, 16, 16, 16)] * 3 + [(2, 16, 8, 8)] + [(2, 32, 8, 8)] * 2 + [(2, 32, 4, 4)] * 3
    skips = tuple(torch.randn(s, generator=g) * 0.1 for s in shapes)
    mid = torch.randn(2, 32, 4, 4, generator=g) * 0.1
    kwargs.update(down_block_additional_residuals=skips, mid_block_additional_residual=mid)
    assert_close(run(ours, **kwargs), run(ref, **kwargs))


def test_return_forms(sd1_pair):
    _, ours, config = sd1_pair
    kwargs = unet_inputs(config)
    with torch.no_grad():
        out = ours(**kwargs)
        as_tuple = ours(**kwargs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.sample) and torch.equal(out[0], out.sample)


def test_channels_last(sd1_pair):
    ref, ours, config = sd1_pair
    kwargs = unet_inputs(config)
    expected = run(ref, **kwargs)
    ours_cl = UNet2DConditionModel.from_config(config).eval()
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl.to(memory_format=torch.channels_last)
    kwargs["sample"] = kwargs["sample"].to(memory_format=torch.channels_last)
    assert_close(run(ours_cl, **kwargs), expected)


# ---- extension points --------------------------------------------------------------------------
def test_fused_qkv_then_unfuse_is_exact():
    ref, ours, config = build_unet_pair("sdxl")
    kwargs = unet_inputs(config)
    before = run(ours, **kwargs)
    ours.fuse_qkv_projections()
    assert all(m.fused is not None for m in ours.attention_modules())
    assert_close(run(ours, **kwargs), run(ref, **kwargs))
    ours.unfuse_qkv_projections()
    assert torch.equal(run(ours, **kwargs), before)
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_custom_attention_backend_is_used(sd1_pair):
    ref, ours, config = sd1_pair
    calls = []

    def math_backend(q, k, v, mask=None):  # fp32 reference attention on (B, H, T, D)
        calls.append(q.shape)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + mask
        return scores.softmax(-1) @ v

    kwargs = unet_inputs(config)
    default = run(ours, **kwargs)
    try:
        ours.set_attention_backend(math_backend)
        out = run(ours, **kwargs)
    finally:
        ours.set_attention_backend(None)
    # 2 attention modules per transformer block, 11 transformer blocks in the tiny SD1 config
    assert len(calls) == 2 * 11
    assert_close(out, run(ref, **kwargs))
    assert torch.equal(run(ours, **kwargs), default)


def _grads(model, kwargs):
    model.zero_grad()
    model(**kwargs).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_gradients():
    _, ours, config = build_unet_pair("sdxl")
    ours.train()
    kwargs = unet_inputs(config)
    plain = _grads(ours, kwargs)
    ours.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing
    checkpointed = _grads(ours, kwargs)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(ours.parameters()))
    for name, grad in plain.items():
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7), name


def _blocks(model):
    from runtime.models.transformer_2d import BasicTransformerBlock

    return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]


def test_token_merge_hook_wraps_each_sublayer(sd1_pair):
    _, ours, config = sd1_pair
    kwargs = unet_inputs(config)
    plain = run(ours, **kwargs)
    ident = lambda x: x  # noqa: E731
    seen = []

    def record(x):
        seen.append(x.shape)
        return (ident,) * 6

    blocks = _blocks(ours)
    try:
        for block in blocks:
            block.token_merge = record
        assert torch.equal(run(ours, **kwargs), plain)
        assert len(seen) == len(blocks) and all(len(s) == 3 for s in seen)  # once per block, on (B, T, C)
        # unmerge applies to the sub-layer's output before the residual add: zeroing the
        # feed-forward's output equals a feed-forward whose last Linear is zero
        for block in blocks:
            block.token_merge = lambda x: (ident, ident, ident, ident, ident, torch.zeros_like)
        hooked = run(ours, **kwargs)
    finally:
        for block in blocks:
            block.token_merge = None
    assert not torch.allclose(hooked, plain)
    zeroed = UNet2DConditionModel.from_config(config).eval()
    zeroed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for block in _blocks(zeroed):
            block.ff.net[2].weight.zero_()
            block.ff.net[2].bias.zero_()
    assert_close(hooked, run(zeroed, **kwargs), rel=1e-6)
    assert torch.equal(run(ours, **kwargs), plain)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@pytest.mark.parametrize("size", [(16, 16), (15, 13)], ids=["even", "odd"])
def test_feature_cache_reuse(name, size):
    ref, ours, config = build_unet_pair(name)
    kwargs = unet_inputs(config, height=size[0], width=size[1])
    full = run(ours, **kwargs)
    other = {**kwargs, "timestep": torch.tensor([300.0, 20.0])}
    full_other = run(ours, **other)
    cuts = [(branch, None) for branch in range(len(ours.down_blocks))]
    cuts += [(branch, layer) for branch in range(len(ours.down_blocks))
             for layer in range(-1, len(ours.down_blocks[branch].resnets))]
    for branch, layer in cuts:
        ours.feature_cache = FeatureCache(branch=branch, mode="store", layer=layer)
        try:
            assert torch.equal(run(ours, **kwargs), full)  # storing changes nothing
            assert ours.feature_cache.features is not None
            ours.feature_cache.mode = "reuse"
            assert torch.allclose(run(ours, **kwargs), full, rtol=0, atol=1e-6)
            # new inputs: the shallow path changes, the cached deep feature does not
            assert not torch.allclose(run(ours, **other), full_other, atol=1e-4)
        finally:
            ours.feature_cache = None
    assert torch.equal(run(ours, **kwargs), full)


def test_feature_cache_misuse(sd1_pair):
    _, ours, config = sd1_pair
    kwargs = unet_inputs(config)
    for cache, match in [(FeatureCache(0, "reuse"), "before any 'store'"), (FeatureCache(5, "store"), "branch=5"),
                         (FeatureCache(0, "keep"), "'keep'"), (FeatureCache(0, "store", layer=9), "layer=9")]:
        ours.feature_cache = cache
        try:
            with pytest.raises(InputError, match=match):
                run(ours, **kwargs)
        finally:
            ours.feature_cache = None


def test_compiles_fullgraph(sd1_pair):
    _, ours, config = sd1_pair
    kwargs = unet_inputs(config)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    assert torch.equal(run(compiled, **kwargs), run(ours, **kwargs))
    torch._dynamo.reset()


# ---- config errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"down_block_types": ["CrossAttnDownBlock2D", "NoSuchBlock2D", "DownBlock2D"]}, "NoSuchBlock2D.*valid:.*DownBlock2D"),
    ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"attention_head_dim": [2, 4]}, r"attention_head_dim=\[2, 4\] has 2 entries"),
    ({"up_block_types": ["UpBlock2D"]}, "up_block_types"),
    ({"act_fn": "tanh"}, "act_fn='tanh'"),
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 8}, "projection_class_embeddings_input_dim"),
    ({"transformer_layers_per_block": [[1, 1], [1, 1], [1, 1]]}, "reverse_transformer_layers_per_block"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        UNet2DConditionModel.from_config(unet_config("sd1", **overrides))


@pytest.mark.parametrize("name", sorted(FULL_UNET_CONFIGS))
def test_real_size_configs_match_diffusers_shapes(name, caplog):
    """The hub's SD1.5 / SD2.1 / SDXL configs build, on the meta device, the same names and shapes."""
    config = FULL_UNET_CONFIGS[name]
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**init)
        ours = UNet2DConditionModel.from_config(config)
    assert "unknown config keys" not in caplog.text
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes


def test_real_config_keys_are_accepted():
    """Every key of a real SDXL config.json (as diffusers writes it) is an __init__ argument."""
    reference = diffusers.UNet2DConditionModel(**unet_config("sdxl"))
    ours = UNet2DConditionModel.from_config(dict(reference.config))
    missing = sorted(k for k in reference.config if not k.startswith("_") and k not in ours.config)
    assert not missing


def test_missing_added_cond_kwargs_is_an_input_error():
    _, ours, config = build_unet_pair("sdxl")
    kwargs = unet_inputs(config)
    kwargs["added_cond_kwargs"] = {"text_embeds": kwargs["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(InputError, match="time_ids"):
        run(ours, **kwargs)


# ---- checkpoints through save_pretrained / from_pretrained ---------------------------------------
@pytest.mark.skipif(not hasattr(UNet2DConditionModel, "from_pretrained"), reason="from_pretrained not written yet")
def test_diffusers_checkpoint_loads_in_ours_and_back(tmp_path):
    ref, _, config = build_unet_pair("sdxl")
    kwargs = unet_inputs(config)
    expected = run(ref, **kwargs)
    ref.save_pretrained(tmp_path / "from_diffusers")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "from_diffusers")
    assert_close(run(ours, **kwargs), expected)
    ours.save_pretrained(tmp_path / "from_ours")
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "from_ours").eval()
    assert_close(run(back, **kwargs), expected)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
