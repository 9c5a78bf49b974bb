"""UNet2DModel: the unconditional denoiser of DDPM (Ho et al. 2020, arXiv:2006.11239) in diffusers' layout.

Config keys and state-dict names are diffusers' (``time_embedding.linear_1``, ``down_blocks.1.attentions.0.to_q``,
``mid_block.resnets.0`` ...). ``forward`` runs down stages, mid, up stages over a stack of named
skip features, like the conditional UNet.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Conv2d

from .block_table import build_block
from .config import register_to_config
from .config_checks import check_unet2d
from .embeddings import TimestepEmbedding, Timesteps
from .errors import ConfigError, InputError
from .modeling import ModelMixin
from .outputs import UNet2DOutput
from .vae_blocks import UNetMidBlock2D


class UNet2DModel(ModelMixin):
    """Predicts noise (or x0 / v) for a noisy image and a timestep; optional class conditioning."""

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,  # map [0, 1] inputs to [-1, 1] first
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,  # default 4 * block_out_channels[0]
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,  # None: one head over all channels
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,  # only for time_embedding_type="learned"
    ):
        super().__init__()
        check_unet2d({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        n = len(block_out_channels)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ConfigError(
                f"UNet2DModel config: block_out_channels has {n} entries but down_block_types has "
                f"{len(down_block_types)} and up_block_types {len(up_block_types)}")
        if act_fn not in ("silu", "swish"):
            raise ConfigError(f"UNet2DModel config act_fn: {act_fn!r} is not supported (only 'silu')")
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise ConfigError(f"UNet2DModel config mid_block_type: {mid_block_type!r} is not supported")
        time_dim = time_embedding_dim or block_out_channels[0] * 4

        self.conv_in = Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        if time_embedding_type == "positional":
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ConfigError("UNet2DModel config: time_embedding_type 'learned' needs num_train_timesteps")
            self.time_proj = nn.Embedding(num_train_timesteps, block_out_channels[0])
        else:
            raise ConfigError(f"UNet2DModel config time_embedding_type: {time_embedding_type!r} is not supported "
                              "(expected 'positional' or 'learned')")
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(block_out_channels[0], time_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ConfigError(f"UNet2DModel config class_embed_type: {class_embed_type!r} is not supported")

        common = dict(temb_channels=time_dim, resnet_eps=norm_eps, resnet_groups=norm_num_groups,
                      resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=act_fn, dropout=dropout)
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, name in enumerate(down_block_types):
            out = block_out_channels[i]
            self.down_blocks.append(build_block(
                name, "UNet2DModel config down_block_types entry", in_channels=channels, out_channels=out,
                num_layers=layers_per_block, add_downsample=i < n - 1, downsample_padding=downsample_padding,
                downsample_type=downsample_type if i < n - 1 else None,
                attention_head_dim=attention_head_dim or out, **common))
            channels = out

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                channels, time_dim, resnet_eps=norm_eps, resnet_groups=norm_num_groups,
                attn_groups=attn_norm_num_groups, add_attention=add_attention,
                attention_head_dim=attention_head_dim or channels, output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift, dropout=dropout)

        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        for i, name in enumerate(up_block_types):
            out = reversed_channels[i]
            self.up_blocks.append(build_block(
                name, "UNet2DModel config up_block_types entry", in_channels=reversed_channels[min(i + 1, n - 1)],
                prev_output_channel=channels, out_channels=out, num_layers=layers_per_block + 1, add_upsample=i < n - 1,
                upsample_type=upsample_type if i < n - 1 else None, resolution_idx=i,
                attention_head_dim=attention_head_dim or out, **common))
            channels = out

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    # ---- forward, in named stages --------------------------------------------------------
    def embed(self, timestep, batch: int, device: torch.device, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Timestep (and class) embedding (B, time_dim); Python numbers become integer steps, as in diffusers."""
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.long, device=device)
        elif t.ndim == 0:
            t = t[None].to(device)
        t = t.expand(batch) if t.shape[0] == 1 else t  # (B,)
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.class_embedding is None:
            if class_labels is not None:
                raise InputError("UNet2DModel: class_labels given but the config has no class embedding "
                                 "(num_class_embeds / class_embed_type)")
            return emb
        if class_labels is None:
            raise InputError("UNet2DModel: this model is class-conditional; pass class_labels")
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels)
        return emb + self.class_embedding(class_labels).to(self.dtype)

    def down(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in and the down stages; returns the features and the skip stack (shallowest first)."""
        h = self.conv_in(h)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        return h, skips

    def up(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Up stages, each consuming ``len(block.resnets)`` skips from the top of the stack, then the output head."""
        for block in self.up_blocks:
            k = len(block.resnets)
            h = block(h, tuple(skips[-k:]), emb)
            del skips[-k:]
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (B, in_C, H, W), timestep (number, or tensor of shape () / (B,)) -> (B, out_C, H, W)."""
        if sample.ndim != 4:
            raise InputError(f"UNet2DModel: sample must be (B, C, H, W), got shape {tuple(sample.shape)}")
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.embed(timestep, sample.shape[0], sample.device, class_labels)
        h, skips = self.down(sample, emb)
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        out = self.up(h, skips, emb)
        return UNet2DOutput(sample=out) if return_dict else (out,)
