"""Timestep and added-condition embeddings of the UNets (diffusers' weight names and math).

- ``timestep_embedding``: the sinusoidal embedding of DDPM (Ho et al. 2020, after the
  Transformer's positional encoding), with diffusers' ``flip_sin_to_cos`` / ``downscale_freq_shift``.
- ``Timesteps``: that function as a parameter-free module (``time_proj``, ``add_time_proj``).
- ``TimestepEmbedding``: ``linear_1`` -> activation -> ``linear_2`` (``time_embedding``,
  ``add_embedding``), with LCM's optional ``cond_proj`` of a guidance embedding.
- ``text_time_embedding``: SDXL's added condition (pooled text embeds + embedded size/crop ids).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear

from .errors import ConfigError, InputError

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}


def activation(name: str, key: str = "act_fn") -> nn.Module:
    """The activation module a config names (``"silu"``, ``"swish"``, ``"gelu"``, ``"mish"``, ``"relu"``)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"{key}={name!r} is not supported; valid: {', '.join(sorted(_ACTIVATIONS))}") from None


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding of 1-D ``timesteps`` (may be fractional): ``(N,) -> (N, dim)`` float32."""
    half = dim // 2
    # Frequencies computed where the timesteps live, every call: a cached buffer would be lost
    # when a model is built on the meta device and loaded with assign=True.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])  # (N, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection of timesteps (``time_proj`` in the UNets)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on an embedded timestep; ``cond_proj`` adds LCM's guidance embedding first."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.linear_1 = Linear(in_channels, time_embed_dim)
        self.cond_proj = Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = activation(act_fn)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = activation(post_act_fn, "timestep_post_act") if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise InputError("timestep_cond was given but the model's config has time_cond_proj_dim=None")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


def text_time_embedding(
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
    added_cond_kwargs: dict | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """SDXL's ``addition_embed_type="text_time"``: embed pooled text and the size/crop ids.

    ``text_embeds``: ``(B, P)``; ``time_ids``: ``(B, K)`` (K=6 for SDXL, 5 for the refiner); each id
    gets ``addition_time_embed_dim`` sinusoidal channels; the concatenation feeds ``add_embedding``.
    """
    if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
        got = sorted(added_cond_kwargs or {})
        raise InputError(
            "addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' and 'time_ids'; "
            f"got keys {got}"
        )
    text_embeds = added_cond_kwargs["text_embeds"]
    time_ids = added_cond_kwargs["time_ids"]
    time_embeds = add_time_proj(time_ids.flatten())  # (B*K, D)
    time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, K*D)
    add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(dtype)  # (B, P + K*D)
    return add_embedding(add_embeds)
