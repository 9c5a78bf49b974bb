"""The VAE's encoder/decoder stages and the plain (no cross-attention) mid block.

``UNetMidBlock2D`` serves both the VAE (no timestep embedding) and ``UNet2DModel``. Weight names
follow diffusers: ``resnets.N``, ``attentions.N``, ``downsamplers.0.conv``, ``upsamplers.0.conv``.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .checkpointing import maybe_checkpoint
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D


def spatial_attention(channels: int, head_dim: int | None, groups: int | None, eps: float, rescale: float = 1.0):
    """Self-attention over a feature map's pixels, as in the VAE and DDPM UNets (``channels // head_dim`` heads)."""
    head_dim = head_dim or channels
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        bias=True,
        norm_num_groups=groups,
        eps=eps,
        residual_connection=True,
        rescale_output_factor=rescale,
    )


class UNetMidBlock2D(nn.Module):
    """resnet, then (attention, resnet) ``num_layers`` times, at the lowest resolution."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None = None,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        attn_groups: int | None = None,
        add_attention: bool = True,
        attention_head_dim: int | None = None,
        output_scale_factor: float = 1.0,
        resnet_time_scale_shift: str = "default",
        dropout: float = 0.0,
    ):
        super().__init__()
        if attn_groups is None and resnet_time_scale_shift == "default":
            attn_groups = resnet_groups  # why: diffusers drops the attention's norm with scale_shift resnets

        def resnet():
            return ResnetBlock2D(
                in_channels, in_channels, temb_channels, groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                time_embedding_norm=resnet_time_scale_shift, output_scale_factor=output_scale_factor,
            )

        self.add_attention = add_attention
        self.resnets = nn.ModuleList([resnet() for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList(
            [spatial_attention(in_channels, attention_head_dim, attn_groups, resnet_eps, output_scale_factor)
             for _ in range(num_layers)] if add_attention else []
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = maybe_checkpoint(self, self.resnets[0], hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.add_attention:
                h = maybe_checkpoint(self, self.attentions[i], h)
            h = maybe_checkpoint(self, resnet, h, temb)
        return h


class DownEncoderBlock2D(nn.Module):
    """Encoder stage: ``num_layers`` resnets without timestep, then an optional stride-2 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups=resnet_groups,
                          eps=resnet_eps, dropout=dropout, output_scale_factor=output_scale_factor)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample else None
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, None)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """Decoder stage: ``num_layers`` resnets, then an optional 2x nearest upsample and conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_groups: int = 32,
        add_upsample: bool = True,
        temb_channels: int | None = None,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups=resnet_groups,
                          eps=resnet_eps, dropout=dropout, output_scale_factor=output_scale_factor)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states
