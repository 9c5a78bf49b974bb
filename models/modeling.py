"""ModelMixin: a torch module with diffusers' config and checkpoint contract.

STUB: the loading helper fills in from_pretrained / save_pretrained / push_to_hub.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, AttentionBackend, sdpa_backend
from .config import ConfigMixin


class ModelMixin(nn.Module, ConfigMixin):
    config_name = "config.json"
    weights_name = "diffusion_pytorch_model"

    # ---- extension points shared by every model -----------------------------------------
    def attention_modules(self):
        return [m for m in self.modules() if isinstance(m, Attention)]

    def set_attention_backend(self, backend: AttentionBackend | None = None) -> None:
        """Route every Attention module through ``backend`` (``None``: PyTorch SDPA)."""
        for m in self.attention_modules():
            m.backend = backend or sdpa_backend

    def fuse_qkv_projections(self) -> None:
        for m in self.attention_modules():
            m.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for m in self.attention_modules():
            m.unfuse_projections()

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
