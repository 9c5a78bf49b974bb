"""Gradient checkpointing for blocks: recompute activations in the backward pass.

A block that supports it sets ``self.gradient_checkpointing = False`` in ``__init__`` and runs its
sub-layers through ``maybe_checkpoint(self, fn, *args)``; ``ModelMixin.enable_gradient_checkpointing``
flips the flag on every such block. Only active in training mode with grad enabled.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(block: torch.nn.Module, fn, *args, **kwargs):
    if getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
