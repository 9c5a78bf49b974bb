"""The spatial transformer of the Stable Diffusion UNets (diffusers' ``Transformer2DModel``).

A feature map is normed, projected to tokens, run through ``BasicTransformerBlock``s
(self-attention, cross-attention to the text, GEGLU feed-forward), projected back and added to
the input. Weight names follow diffusers: ``norm``, ``proj_in``, ``transformer_blocks.N.{norm1,
attn1, norm2, attn2, norm3, ff.net.0.proj, ff.net.2}``, ``proj_out``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, Linear

from .attention import Attention
from .checkpointing import maybe_checkpoint
from .call_slot import CallSlot

TokenFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_NO_MERGE = (_identity,) * 6


def geglu_activation(proj: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` of ``value, gate = proj.chunk(2, -1)``."""
    value, gate = proj.chunk(2, dim=-1)
    return value * F.gelu(gate)


class GEGLU(nn.Module):
    """Linear to twice the width, then ``value * gelu(gate)`` (Shazeer 2020, "GLU Variants").

    Extension points: ``activation`` (a callable ``proj -> out`` computing ``geglu_activation``;
    a pass sets a fused kernel there) and ``fused`` (None, or a callable ``x -> out`` computing
    ``activation(proj(x))`` in one kernel, which returns None for a call it does not take).
    """

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2, bias=bias)
        self.activation: TokenFn = geglu_activation
        self.fused: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            out = self.fused(x)
            if out is not None:
                return out
        return self.activation(self.proj(x))


class FeedForward(CallSlot):
    """GEGLU MLP; ``net`` = [GEGLU, Dropout, Linear] so keys are ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, inner_dim: int | None = None, bias: bool = True):
        super().__init__()
        inner = inner_dim or dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner, bias=bias), nn.Dropout(dropout), Linear(inner, dim, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each with a residual add.

    Token-merge extension point (docs/ARCHITECTURE.md §3, ToMe / tomesd): ``self.token_merge`` is ``None`` or
    a callable ``token_merge(hidden_states) -> (m_attn, u_attn, m_cross, u_cross, m_ff, u_ff)``
    returning six functions on ``(B, T, C)`` tokens. It is called once per forward with the
    block's input; each merge ``m_*`` is applied to the normed input of its sub-layer
    (self-attention, cross-attention, feed-forward) and each unmerge ``u_*`` to that sub-layer's
    output before the residual add: ``x = u_attn(attn1(m_attn(norm1(x)))) + x``. ``None`` is
    the exact eager block.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        heads = dict(heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                     upcast_attention=upcast_attention)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, cross_attention_dim, **heads)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)
        self.token_merge: Callable[[torch.Tensor], tuple[TokenFn, ...]] | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = hidden_states  # (B, T, C)
        m_a, u_a, m_c, u_c, m_f, u_f = _NO_MERGE if self.token_merge is None else self.token_merge(x)
        self_context = encoder_hidden_states if self.only_cross_attention else None
        x = u_a(self.attn1(m_a(self.norm1(x)), self_context, attention_mask)) + x
        x = u_c(self.attn2(m_c(self.norm2(x)), encoder_hidden_states, encoder_attention_mask)) + x
        x = u_f(self.ff(m_f(self.norm3(x)))) + x
        return x


def _to_map(tokens: torch.Tensor, batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, HW, C) -> (B, C, H, W)`` in the memory format of ``like`` (no copy for channels-last)."""
    x = tokens.reshape(batch, height, width, tokens.shape[-1]).permute(0, 3, 1, 2)  # (B, C, H, W) view
    if like.is_contiguous(memory_format=torch.channels_last):
        return x  # the view already has channels-last strides: no copy
    return x.contiguous()


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in`` (1x1 conv, or Linear when ``use_linear_projection``), blocks, ``proj_out``, residual."""

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int = 320,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner)
        else:
            self.proj_in = Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, attention_bias=attention_bias,
                only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
            )
            for _ in range(num_layers)
        )
        if use_linear_projection:
            self.proj_out = Linear(inner, in_channels)
        else:
            self.proj_out = Conv2d(inner, in_channels, kernel_size=1)
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        batch, _, height, width = hidden_states.shape
        x = self.norm(hidden_states)
        if self.use_linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(batch, height * width, x.shape[1]))  # (B, HW, C)
        else:
            x = self.proj_in(x)
            x = x.permute(0, 2, 3, 1).reshape(batch, height * width, x.shape[1])  # (B, HW, inner)
        for block in self.transformer_blocks:
            x = maybe_checkpoint(self, block, x, encoder_hidden_states, attention_mask, encoder_attention_mask)
        if self.use_linear_projection:
            x = _to_map(self.proj_out(x), batch, height, width, residual)
        else:
            x = self.proj_out(_to_map(x, batch, height, width, residual))
        return x + residual
