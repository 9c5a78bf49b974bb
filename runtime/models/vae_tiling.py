"""Tiled VAE encode and decode with diffusers' semantics (AutoencoderKL.enable_tiling).

The image (or latent) is cut into square tiles of ``tile_sample_min_size`` pixels
(``tile_latent_min_size`` latents, the config's ``sample_size`` over the VAE factor) whose
starts are ``(1 - tile_overlap_factor)`` of a tile apart (25% overlap). Each tile is encoded or
decoded alone; each is then blended linearly into the one above it (``blend_v``: rows) and the
one to its left (``blend_h``: columns) over ``tile_overlap_factor`` of an output tile, and
cropped to the part that does not overlap the next. Blending works on tiles already blended
(the row above, the tile to the left), in diffusers' order, so the result is diffusers' image.

Differences from diffusers' loop, none of them in the result: rows are processed one after
another and only the previous row of tiles is kept, so the decoded tiles of the whole image are
never alive at once; the blend is computed for all rows (or columns) of the overlap in one
operation, with the weights ``y / extent`` rounded from double as Python scalars are.
"""
from __future__ import annotations

import torch


def _weights(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - y/extent, y/extent) for y < extent, computed in double and rounded to ``like``'s dtype.

    Lower-precision tiles blend in fp32 (rounded once on the way back).
    """
    ramp = torch.arange(extent, dtype=torch.float64, device=like.device) / extent
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return (1 - ramp).to(dtype), ramp.to(dtype)


def blend_v(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
    """Blend the bottom rows of ``a`` into the top rows of ``b`` (in place in ``b``, returned)."""
    extent = min(a.shape[2], b.shape[2], blend_extent)
    if extent <= 0:
        return b
    keep, take = _weights(extent, b)
    top = a[:, :, a.shape[2] - extent:, :].to(keep.dtype) * keep.view(1, 1, -1, 1)
    b[:, :, :extent, :] = (top + b[:, :, :extent, :].to(take.dtype) * take.view(1, 1, -1, 1)).to(b.dtype)
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
    """Blend the right columns of ``a`` into the left columns of ``b`` (in place in ``b``, returned)."""
    extent = min(a.shape[3], b.shape[3], blend_extent)
    if extent <= 0:
        return b
    keep, take = _weights(extent, b)
    left = a[:, :, :, a.shape[3] - extent:].to(keep.dtype) * keep
    b[:, :, :, :extent] = (left + b[:, :, :, :extent].to(take.dtype) * take).to(b.dtype)
    return b


def tiled(x: torch.Tensor, step: int, tile: int, blend_extent: int, row_limit: int, run) -> torch.Tensor:
    """Run ``run`` on overlapping ``tile``-sized tiles of ``x`` starting every ``step``; blend and crop.

    ``blend_extent`` and ``row_limit`` are in the output's units (pixels when decoding, latents
    when encoding). Only the previous row of outputs is kept while a row is processed.
    """
    height, width = x.shape[2], x.shape[3]
    previous: list[torch.Tensor] | None = None
    rows = []
    for i in range(0, height, step):
        current = []
        for j in range(0, width, step):
            out = run(x[:, :, i:i + tile, j:j + tile])
            if previous is not None:
                out = blend_v(previous[len(current)], out, blend_extent)
            if current:
                out = blend_h(current[-1], out, blend_extent)
            current.append(out)
        rows.append(torch.cat([t[:, :, :row_limit, :row_limit] for t in current], dim=3))
        previous = current
    return torch.cat(rows, dim=2)


def tile_sizes(vae) -> tuple[int, int, float]:
    """(sample tile, latent tile, overlap factor) as set on the VAE (diffusers' attribute names)."""
    return int(vae.tile_sample_min_size), int(vae.tile_latent_min_size), float(vae.tile_overlap_factor)


def tiled_encode_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """Images -> posterior moments, tile by tile (diffusers' ``_tiled_encode``)."""
    sample_tile, latent_tile, overlap = tile_sizes(vae)
    step = int(sample_tile * (1 - overlap))
    blend_extent = int(latent_tile * overlap)

    def run(tile):
        moments = vae.encoder(tile)
        return vae.quant_conv(moments) if vae.quant_conv is not None else moments

    return tiled(x, step, sample_tile, blend_extent, latent_tile - blend_extent, run)


def tiled_decode_sample(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images, tile by tile (diffusers' ``tiled_decode``)."""
    sample_tile, latent_tile, overlap = tile_sizes(vae)
    step = int(latent_tile * (1 - overlap))
    blend_extent = int(sample_tile * overlap)

    def run(tile):
        if vae.post_quant_conv is not None:
            tile = vae.post_quant_conv(tile)
        return vae.decoder(tile)

    return tiled(z, step, latent_tile, blend_extent, sample_tile - blend_extent, run)
