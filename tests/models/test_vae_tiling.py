"""VAE slicing and tiling against diffusers' AutoencoderKL with the same weights and settings."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from runtime.models.vae import AutoencoderKL  # noqa: E402

TINY = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=32,  # tiles of 32 pixels / 16 latents, overlap 25%
)
# the SD layout (4 blocks, factor 8) at small widths; 64-pixel tiles of 8 latents
SD_LIKE = dict(TINY, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=[8, 16, 32, 32], layers_per_block=2, norm_num_groups=8, sample_size=64)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    budget = rel * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= budget, f"max|ours - ref| = {err:.3g} > {budget:.3g}"


def build_pair(config):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**config).eval()
    ours = AutoencoderKL(**config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def tiny():
    return build_pair(TINY)


@pytest.fixture(scope="module")
def sd_like():
    return build_pair(SD_LIKE)


def both(pair, fn):
    ours, ref = pair
    with torch.no_grad():
        return fn(ours), fn(ref)


def test_tile_settings_are_diffusers(tiny, sd_like):
    for ours, ref in (tiny, sd_like):
        for name in ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor"):
            assert getattr(ours, name) == getattr(ref, name), name


@pytest.mark.parametrize("pair_name, shape", [
    ("tiny", (1, 4, 40, 40)),        # 3 x 3 tiles
    ("tiny", (2, 4, 28, 52)),        # not square, batch of 2, a short last tile
    ("sd_like", (1, 4, 20, 20)),     # 160 px: 4 x 4 tiles of the SD layout
    ("sd_like", (1, 4, 9, 17)),      # just over one tile
])
def test_tiled_decode_matches_diffusers(request, pair_name, shape):
    pair = request.getfixturevalue(pair_name)
    torch.manual_seed(1)
    z = torch.randn(shape)
    for m in pair:
        m.enable_tiling()
    try:
        ours, ref = both(pair, lambda m: m.decode(z).sample)
    finally:
        for m in pair:
            m.disable_tiling()
    assert_close(ours, ref)
    untiled, _ = both(pair, lambda m: m.decode(z).sample)
    assert not torch.allclose(untiled, ours, atol=1e-4)  # tiles really were used


@pytest.mark.parametrize("pair_name, shape", [
    ("tiny", (1, 3, 80, 80)),
    ("tiny", (2, 3, 56, 104)),
    ("sd_like", (1, 3, 160, 160)),
])
def test_tiled_encode_matches_diffusers(request, pair_name, shape):
    pair = request.getfixturevalue(pair_name)
    torch.manual_seed(2)
    x = torch.rand(shape) * 2 - 1
    for m in pair:
        m.enable_tiling()
    try:
        ours, ref = both(pair, lambda m: m.encode(x).latent_dist.parameters)
        ours_pub, ref_pub = both(pair, lambda m: m.tiled_encode(x).latent_dist.mean)
    finally:
        for m in pair:
            m.disable_tiling()
    assert_close(ours, ref)
    assert_close(ours_pub, ref_pub)


def test_slicing_matches_diffusers_and_unsliced(tiny):
    torch.manual_seed(3)
    z = torch.randn(3, 4, 12, 12)
    x = torch.rand(3, 3, 24, 24) * 2 - 1
    plain, _ = both(tiny, lambda m: m.decode(z).sample)
    plain_enc, _ = both(tiny, lambda m: m.encode(x).latent_dist.mean)
    for m in tiny:
        m.enable_slicing()
    try:
        ours, ref = both(tiny, lambda m: m.decode(z).sample)
        ours_enc, ref_enc = both(tiny, lambda m: m.encode(x).latent_dist.mean)
    finally:
        for m in tiny:
            m.disable_slicing()
    assert_close(ours, ref)
    assert_close(ours_enc, ref_enc)
    assert_close(ours, plain)
    assert_close(ours_enc, plain_enc)


def test_slicing_and_tiling_together(tiny):
    torch.manual_seed(4)
    z = torch.randn(2, 4, 36, 36)
    for m in tiny:
        m.enable_slicing()
        m.enable_tiling()
    try:
        ours, ref = both(tiny, lambda m: m.decode(z).sample)
    finally:
        for m in tiny:
            m.disable_slicing()
            m.disable_tiling()
    assert_close(ours, ref)


def test_public_tiled_decode_and_custom_tile_size(tiny):
    torch.manual_seed(5)
    z = torch.randn(1, 4, 24, 24)
    for m in tiny:
        m.tile_sample_min_size, m.tile_latent_min_size = 24, 12
    try:
        ours, ref = both(tiny, lambda m: m.tiled_decode(z).sample)
    finally:
        for m in tiny:
            m.tile_sample_min_size, m.tile_latent_min_size = 32, 16
    assert_close(ours, ref)


def test_tiling_below_the_tile_size_is_the_plain_decode(tiny):
    ours, _ = tiny
    torch.manual_seed(6)
    z = torch.randn(1, 4, 16, 16)  # exactly one tile: not tiled, as in diffusers
    with torch.no_grad():
        plain = ours.decode(z).sample
        ours.enable_tiling()
        try:
            tiled = ours.decode(z).sample
        finally:
            ours.disable_tiling()
    assert torch.equal(plain, tiled)


def test_blend_matches_diffusers_formula(tiny):
    ours, ref = tiny
    torch.manual_seed(7)
    a, b = torch.randn(1, 3, 10, 12), torch.randn(1, 3, 10, 12)
    for fn in ("blend_v", "blend_h"):
        got = getattr(ours, fn)(a, b.clone(), 6)
        want = getattr(ref, fn)(a, b.clone(), 6)
        assert torch.equal(got, want), fn
