"""AutoencoderKL: the KL-regularised VAE of latent diffusion (Rombach et al. 2022, arXiv:2112.10752).

Config keys and state-dict names are diffusers' (``encoder.down_blocks.0.resnets.0.conv1``,
``quant_conv``, ``decoder.mid_block.attentions.0.to_q`` ...), so its checkpoints load unchanged.

Memory controls, with diffusers' names and semantics: ``enable_slicing()`` encodes and decodes a
batch one image at a time; ``enable_tiling()`` encodes and decodes images larger than
``tile_sample_min_size`` (the config's ``sample_size``) in overlapping tiles blended linearly
(runtime/models/vae_tiling.py); ``disable_slicing()`` / ``disable_tiling()`` undo them.
``_offload_hook`` (set by runtime/pipelines/offload.py, ``None`` otherwise) runs before
``encode`` and ``decode``, as diffusers' ``apply_forward_hook`` does for accelerate's hooks.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Conv2d

from .block_table import block_class
from .config import register_to_config
from .config_checks import check_autoencoder_kl
from .errors import ConfigError
from .modeling import ModelMixin
from .noise import randn_tensor
from .outputs import AutoencoderKLOutput, DecoderOutput
from .single_file import FromOriginalModelMixin
from .vae_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from .vae_tiling import blend_h, blend_v, tiled_decode_sample, tiled_encode_moments
from .call_slot import CallSlot

SUPPORTED_ACTIVATIONS = ("silu", "swish")


def _lookup_block(name: str, allowed: tuple[type, ...], key: str) -> type:
    """Map a block-type string from the config to its class; only VAE-style blocks fit here."""
    cls = block_class(name, f"AutoencoderKL config {key} entry")
    if cls not in allowed:
        raise ConfigError(f"AutoencoderKL config {key}: {name!r} is not supported (expected one of "
                          f"{', '.join(c.__name__ for c in allowed)})")
    return cls


class DiagonalGaussianDistribution:
    """The posterior q(z|x) = N(mean, exp(logvar)) from the encoder's ``2 * latent_channels`` moments."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn like diffusers (same generator -> same latent)."""
        eps = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                           dtype=self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, h, w); ``other=None`` is N(0, I)."""
        if self.deterministic:
            return torch.zeros(1)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1)
        log_two_pi = 1.8378770664093453
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


class Encoder(nn.Module):
    """Image -> latent moments: conv_in, down stages, mid block, GroupNorm-SiLU-conv_out."""

    def __init__(self, in_channels, out_channels, down_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, double_z=True, mid_block_add_attention=True):
        super().__init__()
        self.conv_in = Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, name in enumerate(down_block_types):
            cls = _lookup_block(name, (DownEncoderBlock2D,), "down_block_types")
            self.down_blocks.append(cls(
                channels, block_out_channels[i], num_layers=layers_per_block, resnet_eps=1e-6,
                resnet_groups=norm_num_groups,
                add_downsample=i < len(block_out_channels) - 1, downsample_padding=0,
            ))
            channels = block_out_channels[i]
        self.mid_block = UNetMidBlock2D(channels, None, resnet_eps=1e-6, resnet_groups=norm_num_groups,
                                        add_attention=mid_block_add_attention, attention_head_dim=channels)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(channels, 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(sample)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Decoder(CallSlot):
    """Latent -> image: conv_in, mid block, up stages (``layers_per_block + 1`` resnets each), conv_out."""

    def __init__(self, in_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, mid_block_add_attention=True):
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        self.conv_in = Conv2d(in_channels, channels, 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels, None, resnet_eps=1e-6, resnet_groups=norm_num_groups,
                                        add_attention=mid_block_add_attention, attention_head_dim=channels)
        self.up_blocks = nn.ModuleList()
        for i, name in enumerate(up_block_types):
            cls = _lookup_block(name, (UpDecoderBlock2D,), "up_block_types")
            self.up_blocks.append(cls(
                channels, reversed_channels[i], num_layers=layers_per_block + 1, resnet_eps=1e-6,
                resnet_groups=norm_num_groups, add_upsample=i < len(block_out_channels) - 1,
            ))
            channels = reversed_channels[i]
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        # why: the up stages may be kept in another dtype than the mid block (partial upcasting)
        h = self.mid_block(h).to(next(self.up_blocks.parameters()).dtype)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class AutoencoderKL(FromOriginalModelMixin, ModelMixin):
    """VAE with a diagonal-Gaussian posterior: ``encode`` -> ``.latent_dist``, ``decode`` -> ``.sample``."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | tuple[int, int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,  # kept for pipelines (SDXL-style normalisation)
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,  # pipelines decode in fp32 when set
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        check_autoencoder_kl({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        if act_fn not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"AutoencoderKL config act_fn: {act_fn!r} is not supported (only 'silu')")
        n = len(block_out_channels)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ConfigError(
                f"AutoencoderKL config: block_out_channels has {n} entries but down_block_types has "
                f"{len(down_block_types)} and up_block_types {len(up_block_types)}")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ConfigError(f"AutoencoderKL config: block_out_channels {list(block_out_channels)} "
                              f"not divisible by norm_num_groups={norm_num_groups}")
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, block_out_channels,
                               layers_per_block, norm_num_groups, True, mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, block_out_channels,
                               layers_per_block, norm_num_groups, mid_block_add_attention)
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        # memory controls (diffusers' attribute names; users may set the tile sizes by hand)
        self.use_slicing = False
        self.use_tiling = False
        side = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(side)
        self.tile_latent_min_size = int(side / (2 ** (len(block_out_channels) - 1)))
        self.tile_overlap_factor = 0.25
        self._offload_hook = None

    # ---- memory controls -------------------------------------------------------------------
    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time (less memory for batches, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode and decode large images in overlapping tiles (memory bounded by the tile size)."""
        self.use_tiling = bool(use_tiling)

    def disable_tiling(self) -> None:
        self.use_tiling = False

    blend_v = staticmethod(blend_v)
    blend_h = staticmethod(blend_h)

    def _before_call(self, x: torch.Tensor) -> torch.Tensor:
        """The offload hook (if any) brings the weights; the input follows them."""
        if self._offload_hook is not None:
            self._offload_hook(self)
            device = self.device
            if x.device != device:
                x = x.to(device)
        return x

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> posterior moments (tiled above the tile size when tiling is on)."""
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self._tiled_encode(x)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_encode_moments(self, x)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True):
        """Tiled encode whatever the size (diffusers' public, deprecated-there form): the posterior."""
        posterior = DiagonalGaussianDistribution(self._tiled_encode(self._before_call(x)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, in_channels, H, W) -> posterior over latents (B, latent_channels, H/f, W/f)."""
        x = self._before_call(x)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return tiled_decode_sample(self, z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True):
        """Tiled decode whatever the size (diffusers' public method)."""
        image = tiled_decode_sample(self, self._before_call(z))
        return DecoderOutput(sample=image) if return_dict else (image,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f); ``generator`` unused."""
        z = self._before_call(z)
        if self.use_slicing and z.shape[0] > 1:
            image = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            image = self._decode(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """Encode then decode; the posterior's mode unless ``sample_posterior``."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
