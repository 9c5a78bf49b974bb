"""AutoencoderKL against diffusers' on tiny configs: same keys, same numbers, same random draws."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from runtime.models import checkpointing  # noqa: E402
from runtime.models.errors import ConfigError  # noqa: E402
from runtime.models.vae import AutoencoderKL  # noqa: E402

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 budget: 1e-5 relative to the reference's magnitude (at least 1)."""
    assert ours.shape == ref.shape
    budget = 1e-5 * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= budget, f"max|ours - ref| = {err:.3g} > {budget:.3g}"


def build_pair(**overrides):
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**config).eval()
    ours = AutoencoderKL(**config).eval()
    ref_sd = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    return ours, ref


@pytest.mark.parametrize("overrides", [
    {},
    {"mid_block_add_attention": False},
    {"use_quant_conv": False, "use_post_quant_conv": False},
    {"block_out_channels": [32, 32, 64], "layers_per_block": 2, "latent_channels": 3,
     "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3},
], ids=["default", "no_mid_attention", "no_quant_convs", "three_stages"])
@torch.no_grad()
def test_encode_decode_forward_match_diffusers(overrides):
    ours, ref = build_pair(**overrides)
    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))  # odd aspect on purpose

    post, ref_post = ours.encode(x).latent_dist, ref.encode(x).latent_dist
    for name in ("mean", "logvar", "std", "var"):
        assert_close(getattr(post, name), getattr(ref_post, name))
    assert_close(post.mode(), ref_post.mode())
    assert_close(post.kl(), ref_post.kl())
    assert_close(post.kl(ref_post), ref_post.kl(post))  # symmetric use of other's moments
    z, z_ref = post.sample(torch.Generator().manual_seed(7)), ref_post.sample(torch.Generator().manual_seed(7))
    assert_close(z, z_ref)

    assert_close(ours.decode(z).sample, ref.decode(z).sample)
    assert_close(ours.decode(z, return_dict=False)[0], ref.decode(z).sample)
    assert_close(ours(x).sample, ref(x).sample)
    out = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    assert_close(out, ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample)


@torch.no_grad()
def test_sample_with_generator_list_matches_diffusers():
    ours, ref = build_pair()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    assert_close(ours.encode(x).latent_dist.sample(gens()), ref.encode(x).latent_dist.sample(gens()))


def test_config_round_trips_through_from_config():
    ours, ref = build_pair()
    rebuilt = AutoencoderKL.from_config(dict(ref.config))
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    for key in ("block_out_channels", "latent_channels", "scaling_factor", "force_upcast", "norm_num_groups"):
        assert plain(rebuilt.config[key]) == plain(ref.config[key]), key
    assert set(rebuilt.state_dict()) == set(ref.state_dict())


def test_gradient_checkpointing_gives_equal_gradients(monkeypatch):
    ours, _ = build_pair()
    ours.train()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def grads():
        ours.zero_grad()
        ours(x).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing
    checkpointed = grads()
    assert calls, "no block ran through torch.utils.checkpoint"
    ours.disable_gradient_checkpointing()
    assert not ours.is_gradient_checkpointing
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, rtol=1e-5, atol=1e-7), name


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="down_block_types"):
        AutoencoderKL(**{**TINY, "down_block_types": ["CrossAttnDownBlock2D", "DownEncoderBlock2D"]})
    with pytest.raises(ConfigError, match="block_out_channels"):
        AutoencoderKL(**{**TINY, "block_out_channels": [32]})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderKL(**{**TINY, "norm_num_groups": 5})
    with pytest.raises(ConfigError, match="act_fn"):
        AutoencoderKL(**{**TINY, "act_fn": "gelu"})


@torch.no_grad()
def test_checkpoints_load_both_ways(tmp_path):
    """diffusers.save_pretrained -> ours.from_pretrained, and ours.save_pretrained -> diffusers."""
    _, ref = build_pair()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ref.save_pretrained(tmp_path / "theirs")
    ours = AutoencoderKL.from_pretrained(tmp_path / "theirs").eval()
    assert_close(ours(x).sample, ref(x).sample)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert_close(back(x).sample, ref(x).sample)
    assert back.config.scaling_factor == ref.config.scaling_factor
