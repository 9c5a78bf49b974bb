"""The down, mid and up stages of the UNets (diffusers' block classes, names and weight keys).

Weight keys: ``resnets.N``, ``attentions.N`` (a ``Transformer2DModel``), ``downsamplers.0.conv``,
``upsamplers.0.conv``. Every block takes the same call: ``block(hidden_states, temb,
encoder_hidden_states=, attention_mask=, encoder_attention_mask=)`` (down blocks return
``(hidden_states, skips)``; up blocks also take ``res_hidden_states_tuple`` and ``upsample_size``),
so the UNet needs no per-type branches. Resnets run through ``maybe_checkpoint``; the
transformers checkpoint their own blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpointing import maybe_checkpoint
from .errors import ConfigError
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer_2d import Transformer2DModel


def _check_resnet_options(block: str, resnet_act_fn: str, resnet_pre_norm: bool) -> None:
    if resnet_act_fn not in ("swish", "silu"):
        raise ConfigError(f"{block}: resnet_act_fn={resnet_act_fn!r} is not supported; valid: 'silu', 'swish'")
    if not resnet_pre_norm:
        raise ConfigError(f"{block}: resnet_pre_norm=False is not supported")


def _per_layer(value: int | list[int] | tuple[int, ...], num_layers: int, block: str) -> list[int]:
    """``transformer_layers_per_block`` for one block: an int for all its layers, or one per layer."""
    if isinstance(value, int):
        return [value] * num_layers
    if len(value) < num_layers:  # longer lists are cut, as diffusers indexes them (the mid block)
        raise ConfigError(f"{block}: transformer_layers_per_block={list(value)} has {len(value)} entries, "
                          f"expected {num_layers} (one per layer)")
    return list(value)[:num_layers]


def _transformer(channels: int, heads: int, layers: int, groups: int, cross_attention_dim: int,
                 use_linear_projection: bool, only_cross_attention: bool, upcast_attention: bool,
                 dropout: float = 0.0) -> Transformer2DModel:
    # diffusers' naming quirk: the blocks get the head COUNT and derive the head width.
    return Transformer2DModel(
        heads, channels // heads, in_channels=channels, num_layers=layers, dropout=dropout,
        norm_num_groups=groups, cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
        upcast_attention=upcast_attention,
    )


class DownBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional stride-2 conv; every output is a skip feature."""

    has_cross_attention = False

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
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        _check_resnet_options(type(self).__name__, resnet_act_fn, resnet_pre_norm)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                groups=resnet_groups, eps=resnet_eps, dropout=dropout,
                time_embedding_norm=resnet_time_scale_shift, output_scale_factor=output_scale_factor,
            )
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels,
                                        padding=downsample_padding)])
            if add_downsample else None
        )
        self.gradient_checkpointing = False

    def _attend(self, index: int, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask,
                encoder_attention_mask) -> torch.Tensor:
        """The layer's attention after resnet ``index``; none in this block."""
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        run_downsample: bool = True,
        num_layers: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Returns ``(hidden_states, skips)``. DeepCache's shallow path runs part of the block:
        ``run_downsample=False`` leaves out the downsampler, whose output only deeper stages read;
        ``num_layers`` runs only the first layers (resnet + attention) and no downsampler."""
        skips = ()
        for i, resnet in enumerate(self.resnets[:num_layers]):
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
            hidden_states = self._attend(i, hidden_states, encoder_hidden_states, attention_mask,
                                         encoder_attention_mask)
            skips += (hidden_states,)
        if self.downsamplers is not None and run_downsample and num_layers is None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """``DownBlock2D`` with a ``Transformer2DModel`` after each resnet."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        add_downsample: bool = True,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__(in_channels, out_channels, temb_channels, dropout, num_layers, resnet_eps,
                         resnet_time_scale_shift, resnet_act_fn, resnet_groups, resnet_pre_norm,
                         output_scale_factor, add_downsample, downsample_padding)
        layers = _per_layer(transformer_layers_per_block, num_layers, type(self).__name__)
        self.attentions = nn.ModuleList(
            _transformer(out_channels, num_attention_heads, layers[i], resnet_groups, cross_attention_dim,
                         use_linear_projection, only_cross_attention, upcast_attention)
            for i in range(num_layers)
        )

    def _attend(self, index, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask):
        return self.attentions[index](hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) ``num_layers`` times, at the lowest resolution."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None,
        out_channels: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_groups_out: int | None = None,
        resnet_pre_norm: bool = True,
        num_attention_heads: int = 1,
        output_scale_factor: float = 1.0,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        _check_resnet_options(type(self).__name__, resnet_act_fn, resnet_pre_norm)
        out_channels = out_channels or in_channels
        groups_out = resnet_groups_out or resnet_groups
        layers = _per_layer(transformer_layers_per_block, num_layers, type(self).__name__)
        resnet = dict(temb_channels=temb_channels, eps=resnet_eps, dropout=dropout,
                      time_embedding_norm=resnet_time_scale_shift, output_scale_factor=output_scale_factor)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels, out_channels, groups=resnet_groups, groups_out=groups_out, **resnet)]
            + [ResnetBlock2D(out_channels, out_channels, groups=groups_out, **resnet) for _ in range(num_layers)]
        )
        self.attentions = nn.ModuleList(
            _transformer(out_channels, num_attention_heads, layers[i], groups_out, cross_attention_dim,
                         use_linear_projection, False, upcast_attention)
            for i in range(num_layers)
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = maybe_checkpoint(self, self.resnets[0], hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
            hidden_states = maybe_checkpoint(self, resnet, hidden_states, temb)
        return hidden_states


class UpBlock2D(nn.Module):
    """``num_layers`` resnets, each on ``cat(hidden, skip)`` (skips popped from the end), then 2x up."""

    has_cross_attention = False

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
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
    ):
        super().__init__()
        _check_resnet_options(type(self).__name__, resnet_act_fn, resnet_pre_norm)
        self.resolution_idx = resolution_idx
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(
                resnet_in + skip_channels, out_channels, temb_channels=temb_channels, groups=resnet_groups,
                eps=resnet_eps, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
                output_scale_factor=output_scale_factor,
            ))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)]) \
            if add_upsample else None
        self.gradient_checkpointing = False

    def _attend(self, index: int, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask,
                encoder_attention_mask) -> torch.Tensor:
        return hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Layers ``start..stop-1`` (all by default), then the upsampler if the last layer ran.

        ``res_hidden_states_tuple`` holds one skip per layer run; the last is used first.
        DeepCache splits the block at a layer: store the state entering it, resume from there.
        """
        stop = len(self.resnets) if stop is None else stop
        for i in range(start, stop):
            skip = res_hidden_states_tuple[-1 - (i - start)]
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = maybe_checkpoint(self, self.resnets[i], hidden_states, temb)
            hidden_states = self._attend(i, hidden_states, encoder_hidden_states, attention_mask,
                                         encoder_attention_mask)
        if self.upsamplers is not None and stop == len(self.resnets):
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """``UpBlock2D`` with a ``Transformer2DModel`` after each resnet."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        temb_channels: int | None,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, resolution_idx, dropout,
                         num_layers, resnet_eps, resnet_time_scale_shift, resnet_act_fn, resnet_groups,
                         resnet_pre_norm, output_scale_factor, add_upsample)
        layers = _per_layer(transformer_layers_per_block, num_layers, type(self).__name__)
        self.attentions = nn.ModuleList(
            _transformer(out_channels, num_attention_heads, layers[i], resnet_groups, cross_attention_dim,
                         use_linear_projection, only_cross_attention, upcast_attention)
            for i in range(num_layers)
        )

    def _attend(self, index, hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask):
        return self.attentions[index](hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
