"""What a LoRA file holds once read, in one form whatever its format (runtime/lora/formats.py).

A parsed file is ``{component: {module_path: LoraLayer}}``: components are the pipeline's names
(``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``), module paths are diffusers' /
transformers' module names inside that component (``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"``,
``"text_model.encoder.layers.0.self_attn.q_proj"``), which are our models' names too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Parsed = dict[str, dict[str, "LoraLayer"]]


@dataclass
class LoraLayer:
    """One layer's low-rank pair: ``delta W = scale * up @ down`` with ``scale = alpha / rank``.

    ``down`` (PEFT's ``lora_A``, Kohya's ``lora_down``): ``(rank, in)`` for a linear,
    ``(rank, in, kh, kw)`` for a convolution. ``up`` (``lora_B`` / ``lora_up``): ``(out, rank)`` or
    ``(out, rank, 1, 1)``. ``alpha`` None means alpha equals the rank (scale 1). ``key`` is the
    file's key of the down weight, for messages that name what the file said.

    The tensors are the file's own (not copied); a parsed file never writes to them.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    key: str | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scale * up @ down`` in the layer weight's shape, computed in fp32 (then ``dtype``)."""
        down, up = self.down.to(torch.float32), self.up.to(torch.float32)
        if not self.is_conv:
            return (self.scale * (up @ down)).to(dtype)
        # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return (self.scale * delta).to(dtype)
