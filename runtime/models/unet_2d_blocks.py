"""The self-attention stages of the unconditional UNet (DDPM layout): AttnDownBlock2D, AttnUpBlock2D.

Each resnet is followed by a spatial self-attention over the feature map's pixels; everything
else (resnets, samplers, skips, checkpointing, the call signature) is the plain stage's, through
its ``_attend`` slot. Weight names follow diffusers: ``resnets.N``, ``attentions.N``
(``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), ``downsamplers.0.conv``, ``upsamplers.0.conv``.
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpointing import maybe_checkpoint
from .errors import ConfigError
from .unet_blocks import DownBlock2D, UpBlock2D
from .vae_blocks import spatial_attention


def _check_sampler_type(block: str, kind: str, value: str | None) -> None:
    if value not in ("conv", None):
        raise ConfigError(f"{block}: {kind}_type={value!r} is not supported; valid: 'conv'")


class AttnDownBlock2D(DownBlock2D):
    """(resnet, self-attention) x ``num_layers``, then an optional stride-2 conv; returns the skips too."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int | None = 1,  # None: one head over all channels
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        downsample_type: str | None = "conv",
    ):
        _check_sampler_type(type(self).__name__, "downsample", downsample_type)
        super().__init__(
            in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
            resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm, output_scale_factor=output_scale_factor,
            add_downsample=add_downsample and downsample_type is not None, downsample_padding=downsample_padding,
        )
        self.attentions = nn.ModuleList(
            spatial_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers)
        )

    def _attend(self, index: int, hidden_states: torch.Tensor, *unused) -> torch.Tensor:
        return maybe_checkpoint(self, self.attentions[index], hidden_states)


class AttnUpBlock2D(UpBlock2D):
    """(concat skip, resnet, self-attention) x ``num_layers``, then an optional 2x upsample."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int | None,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int | None = 1,  # None: one head over all channels
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        upsample_type: str | None = "conv",
    ):
        _check_sampler_type(type(self).__name__, "upsample", upsample_type)
        super().__init__(
            in_channels, prev_output_channel, out_channels, temb_channels, resolution_idx=resolution_idx,
            dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
            resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups, resnet_pre_norm=resnet_pre_norm, output_scale_factor=output_scale_factor,
            add_upsample=add_upsample and upsample_type is not None,
        )
        self.attentions = nn.ModuleList(
            spatial_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers)
        )

    def _attend(self, index: int, hidden_states: torch.Tensor, *unused) -> torch.Tensor:
        return maybe_checkpoint(self, self.attentions[index], hidden_states)
