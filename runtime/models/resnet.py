"""Residual conv blocks and the 2x down/up samplers shared by the UNets and the VAE.

Weight names follow diffusers: ``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``,
``conv_shortcut``; samplers hold ``conv``.

Extension points (docs/ARCHITECTURE.md §3): ``ResnetBlock2D.norm_silu``, a callable ``(norm, x) ->
silu(norm(x))`` for its GroupNorm-then-SiLU steps (default ``group_norm_silu``); a pass sets a fused
kernel there. The last convolution gets the block's residual as its ``add`` input
(runtime/models/layers.py), so an entry of its compute chain can add it inside the convolution's output
(runtime/optim/winograd.py). ``Upsample2D.conv_2x``: ``None`` or a callable ``(module, x) -> conv(upsample_2x(x))``
for the doubling-then-conv step (runtime/optim/upsample.py folds the upsampling into the conv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, Linear
from .call_slot import CallSlot


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``: the eager form of a ResnetBlock2D's norm-then-activation."""
    return F.silu(norm(x))


class ResnetBlock2D(CallSlot):
    """GroupNorm-SiLU-conv twice, with an optional timestep embedding added in between."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D: unsupported time_embedding_norm {time_embedding_norm!r}")
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            proj_out = out_channels * 2 if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = Linear(temb_channels, proj_out)
        else:
            self.time_emb_proj = None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.norm_silu = group_norm_silu  # extension point: (GroupNorm, x) -> silu(norm(x)); a pass fuses it
        needs_shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias) if needs_shortcut else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.norm_silu(self.norm1, x))
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (B, C, 1, 1)
            if self.time_embedding_norm == "scale_shift":
                scale, shift = t.chunk(2, dim=1)
                h = self.nonlinearity(self.norm2(h) * (1 + scale) + shift)
            else:
                h = self.norm_silu(self.norm2, h + t)
        else:
            h = self.norm_silu(self.norm2, h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = self.conv2(self.dropout(h), add=x)  # x + conv2(h); the layer's chain may add it in its kernel
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Halve height and width with a stride-2 conv (``padding=0`` pads right/bottom as SD's VAE)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        out_channels = out_channels or channels
        self.padding = padding
        if use_conv:
            self.conv = Conv2d(channels, out_channels, 3, stride=2, padding=padding)
        else:
            self.conv = nn.AvgPool2d(2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0 and isinstance(self.conv, nn.Conv2d):
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double height and width (nearest neighbour), then a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.conv = Conv2d(channels, out_channels, 3, padding=1) if use_conv else None
        self.conv_2x = None

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None and self.conv is not None and self.conv_2x is not None:
            return self.conv_2x(self, x)
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x) if self.conv is not None else x
