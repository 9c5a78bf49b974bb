"""UNet2DModel (unconditional, DDPM layout) against diffusers' on tiny configs: same keys, same numbers."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from runtime.models import checkpointing  # noqa: E402
from runtime.models.errors import ConfigError, InputError  # noqa: E402
from runtime.models.unet_2d import UNet2DModel  # noqa: E402

TINY = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=8,
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
    ref = diffusers.UNet2DModel(**config).eval()
    ours = UNet2DModel(**config).eval()
    ref_sd = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    return ours, ref


@pytest.mark.parametrize("overrides", [
    {},
    {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
    {"resnet_time_scale_shift": "scale_shift"},  # mid-block attention without group norm
    {"attention_head_dim": None, "add_attention": False, "mid_block_scale_factor": 1.41421356},
    {"center_input_sample": True, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6,
     "downsample_padding": 0},  # ddpm-cifar10-32 style
    {"block_out_channels": [32, 32, 64], "layers_per_block": 2, "mid_block_type": None,
     "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
     "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
], ids=["default", "scale_shift", "scale_shift_no_attn_norm", "one_head_no_mid_attn", "ddpm_cifar_style",
        "three_stages_no_mid"])
@torch.no_grad()
def test_forward_matches_diffusers(overrides):
    ours, ref = build_pair(**overrides)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 750])
    assert_close(ours(x, t).sample, ref(x, t).sample)
    assert_close(ours(x, t, return_dict=False)[0], ref(x, t).sample)


@pytest.mark.parametrize("timestep", [10, 999.0, 12.7, torch.tensor(5), torch.tensor([42])],
                         ids=["int", "float", "fractional_float", "0d_tensor", "1_elem_tensor"])
@torch.no_grad()
def test_timestep_forms_match_diffusers(timestep):
    ours, ref = build_pair()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert_close(ours(x, timestep).sample, ref(x, timestep).sample)


@torch.no_grad()
def test_class_conditional_matches_diffusers():
    ours, ref = build_pair(num_class_embeds=5)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 4])
    assert_close(ours(x, torch.tensor(7), class_labels=labels).sample,
                 ref(x, torch.tensor(7), class_labels=labels).sample)
    with pytest.raises(InputError, match="class_labels"):
        ours(x, 7)


@torch.no_grad()
def test_learned_time_embedding_matches_diffusers():
    ours, ref = build_pair(time_embedding_type="learned", num_train_timesteps=50)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert_close(ours(x, torch.tensor([17])).sample, ref(x, torch.tensor([17])).sample)


def test_gradient_checkpointing_gives_equal_gradients(monkeypatch):
    ours, _ = build_pair()
    ours.train()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def grads():
        ours.zero_grad()
        ours(x, torch.tensor([5, 600])).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours.enable_gradient_checkpointing()
    assert ours.is_gradient_checkpointing
    checkpointed = grads()
    assert calls, "no block ran through torch.utils.checkpoint"
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, rtol=1e-5, atol=1e-7), name


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ConfigError, match="block_out_channels"):
        UNet2DModel(**{**TINY, "block_out_channels": [32]})
    with pytest.raises(ConfigError, match="time_embedding_type"):
        UNet2DModel(**{**TINY, "time_embedding_type": "fourier"})
    with pytest.raises(ConfigError, match="downsample_type"):
        UNet2DModel(**{**TINY, "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
                       "downsample_type": "resnet"})
    ours, _ = build_pair()
    with pytest.raises(InputError, match="shape"):
        ours(torch.zeros(3, 16, 16), 1)


@torch.no_grad()
def test_checkpoints_load_both_ways(tmp_path):
    """diffusers.save_pretrained -> ours.from_pretrained, and ours.save_pretrained -> diffusers."""
    _, ref = build_pair(num_class_embeds=3)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([2])
    ref.save_pretrained(tmp_path / "theirs")
    ours = UNet2DModel.from_pretrained(tmp_path / "theirs").eval()
    assert_close(ours(x, 11, labels).sample, ref(x, 11, labels).sample)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    assert_close(back(x, 11, labels).sample, ref(x, 11, labels).sample)
