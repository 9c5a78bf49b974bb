"""ModelMixin: a torch module with diffusers' config and checkpoint contract.

STUB: the loading helper fills in from_pretrained / save_pretrained / push_to_hub.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, AttentionBackend, sdpa_backend
from .config import ConfigMixin
from .step_context import StepAnnouncer, StepContext


class ModelMixin(nn.Module, ConfigMixin):
    config_name = "config.json"
    weights_name = "diffusion_pytorch_model"

    # ---- extension points shared by every model -----------------------------------------
    def attention_modules(self):
        """Every submodule with an attention ``backend`` slot (ours and the CLIP encoder's)."""
        return [m for m in self.modules() if isinstance(m, Attention) or hasattr(m, "backend")]

    def announce_step(self, index: int, count: int, timestep: float) -> None:
        """Called by pipelines before each denoising step (per thread; see step_context.py)."""
        self._step_announcer().set(StepContext(int(index), int(count), float(timestep)))

    def clear_step(self) -> None:
        self._step_announcer().set(None)

    @property
    def step_context(self) -> StepContext | None:
        return self._step_announcer().get()

    def _step_announcer(self) -> StepAnnouncer:
        announcer = self.__dict__.get("_announcer")
        if announcer is None:
            announcer = StepAnnouncer()
            self.__dict__["_announcer"] = announcer
        return announcer

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward (training only); see checkpointing.py."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def set_attention_backend(self, backend: AttentionBackend | None = None) -> None:
        """Route every Attention module through ``backend`` (``None``: PyTorch SDPA)."""
        for m in self.attention_modules():
            m.backend = backend or sdpa_backend

    def fuse_qkv_projections(self) -> None:
        for m in self.attention_modules():
            if hasattr(m, "fuse_projections"):
                m.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for m in self.attention_modules():
            if hasattr(m, "unfuse_projections"):
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
