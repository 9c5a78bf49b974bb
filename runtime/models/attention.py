"""Multi-head attention with diffusers' weight names and the slots passes plug into.

Extension points (docs/ARCHITECTURE.md §3):
- ``Attention.backend``: a callable ``(q, k, v, mask) -> out`` on ``(batch, heads, tokens,
  head_dim)`` tensors. Default ``sdpa_backend`` (PyTorch SDPA). Set per module, or for a whole
  model with ``ModelMixin.set_attention_backend``.
- ``Attention.output_hook``: ``None`` or a callable ``(module, compute) -> out`` where
  ``compute()`` runs the attention; a pass (TGATE) may return a cached output instead.
- ``fuse_projections`` / ``unfuse_projections``: one matmul for q/k/v (self-attention) or k/v
  (cross-attention); the separate projections stay, so unfusing is exact.
- ``Attention.slice_size`` (``set_attention_slice``): ``None``, or diffusers' sliced attention,
  ``slice_size`` (batch x head) rows at a time, each slice computed by ``backend``
  (runtime/models/attention_slicing.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention_slicing import check_slice_size, sliced_attention
from .layers import Linear, concatenated_linear, fused_outputs
from .call_slot import CallSlot

AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's scaled-dot-product attention; the default backend everywhere."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def xformers_backend(attention_op=None) -> AttentionBackend:
    """A backend running xformers' ``memory_efficient_attention`` (with ``op=attention_op``).

    xformers takes ``(B, T, H, D)`` and an additive float bias of shape ``(B, H, T, S)`` whose
    last dimension is stored padded to a multiple of 8 (its alignment rule); a boolean mask
    (True = attend) becomes that bias.
    """
    def backend(q, k, v, mask=None):
        import xformers.ops as xops

        bias = None
        if mask is not None:
            b, h, t, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            padded = torch.zeros(b, h, t, (s + 7) // 8 * 8, dtype=q.dtype, device=q.device)
            padded[..., :s] = mask.to(q.dtype).expand(b, h, t, s)
            bias = padded[..., :s]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, op=attention_op)
        return out.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)

    backend.is_xformers = True
    backend.attention_op = attention_op
    return backend


def xformers_ready() -> None:
    """Raise a clear error unless xformers is installed and a CUDA device runs its kernel."""
    import importlib.util

    from .errors import BackendUnavailableError, DependencyMissingError

    if importlib.util.find_spec("xformers") is None:
        raise DependencyMissingError(
            "enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers; "
            "see https://github.com/facebookresearch/xformers)", name="xformers")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "enable_xformers_memory_efficient_attention: xformers' memory-efficient attention runs only on "
            "CUDA GPUs, and torch.cuda.is_available() is False here")
    import xformers.ops as xops

    q = torch.randn((1, 2, 40), device="cuda")
    xops.memory_efficient_attention(q, q, q)  # xformers' own error if its kernel cannot run here


class Attention(CallSlot):
    """Attention over token sequences (or a 4-D feature map when ``norm_num_groups`` is set).

    Weight names follow diffusers: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross_attention = cross_attention_dim is not None
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (
            nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups is not None else None
        )
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(kv_dim, inner, bias=bias)
        self.to_v = Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self.backend: AttentionBackend = sdpa_backend
        self.output_hook = None
        self.fused: str | None = None  # None, "qkv" or "kv"
        self.slice_size: int | None = None  # sliced attention through ``backend`` (None: one call)

    # ---- sliced attention (diffusers' set_attention_slice) ---------------------------------
    @property
    def sliceable_head_dim(self) -> int:
        """What diffusers slices over: the head count (slices run over batch x heads)."""
        return self.heads

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute attention ``slice_size`` (batch x head) rows at a time; ``None`` turns it off."""
        check_slice_size(slice_size, self.sliceable_head_dim)
        self.slice_size = slice_size

    # ---- fused projections ---------------------------------------------------------------
    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate q/k/v (self-attention) or k/v (cross-attention) weights into one Linear."""
        if self.fused is not None:
            return
        parts = [self.to_k, self.to_v] if self.is_cross_attention else [self.to_q, self.to_k, self.to_v]
        fused = concatenated_linear(parts)
        self.fused = "kv" if self.is_cross_attention else "qkv"
        setattr(self, f"to_{self.fused}", fused)

    def unfuse_projections(self) -> None:
        """Drop the fused Linear; the untouched separate projections compute again."""
        if self.fused is not None:
            delattr(self, f"to_{self.fused}")
            self.fused = None

    def fused_projection(self):
        """``(fused Linear, its parts)`` while fused (runtime/lora/fuse.py refreshes it after weight edits)."""
        parts = [self.to_k, self.to_v] if self.fused == "kv" else [self.to_q, self.to_k, self.to_v]
        return getattr(self, f"to_{self.fused}"), parts

    @torch.no_grad()
    def refresh_fused_projection(self) -> None:
        """Concatenate the parts' current weights into the fused Linear again, in place (``copy_``): the
        fused copy does not follow edits of ``to_q`` / ``to_k`` / ``to_v`` by itself."""
        if self.fused is None:
            return
        fused, parts = self.fused_projection()
        fused.weight.copy_(torch.cat([p.weight for p in parts], dim=0))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts], dim=0))

    # ---- forward ---------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, context: torch.Tensor):
        # the fused matmul computes the projections' operators; each projection's chain may only add
        # terms on top (an adapter's), which come after it (runtime/models/layers.py, ``side_terms``);
        # any other entry and every projection runs its own chain
        if self.fused == "qkv" and context is x:
            fused = fused_outputs(self.to_qkv, (self.to_q, self.to_k, self.to_v), x)
            if fused is not None:
                return fused
        q = self.to_q(x)
        kv = fused_outputs(self.to_kv, (self.to_k, self.to_v), context) if self.fused == "kv" else None
        k, v = kv if kv is not None else (self.to_k(context), self.to_v(context))
        return q, k, v

    def _attend(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        context = x if context is None else context
        q, k, v = self._project(x, context)
        # (B, T, H*D) -> (B, H, T, D)
        q = q.view(batch, tokens, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(batch, -1, self.heads, self.dim_head).transpose(1, 2)
        if self.slice_size is None:
            out = self.backend(q, k, v, mask)
        else:
            out = sliced_attention(self.backend, q, k, v, mask, self.slice_size)
        # (B, H, T, D) -> (B, T, H*D)
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))

    def _compute(self, hidden_states, encoder_hidden_states, attention_mask):
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        if spatial:
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self._attend(hidden_states, encoder_hidden_states, attention_mask)
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.output_hook is not None:
            return self.output_hook(self, lambda: self._compute(hidden_states, encoder_hidden_states, attention_mask))
        return self._compute(hidden_states, encoder_hidden_states, attention_mask)
