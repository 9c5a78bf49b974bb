"""Fused QKV: one matmul for q/k/v of self-attention and k/v of cross-attention (exact)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Pass
from .components import pipeline_models


@dataclass(frozen=True)
class FusedQKVPass(Pass):
    name = "fused_qkv"
    exact = True

    def supports(self, pipe) -> str | None:
        if not any(m.attention_modules() for m in pipeline_models(pipe).values()):
            return "no attention modules in this pipeline"
        return None

    def apply(self, pipe) -> None:
        for m in pipeline_models(pipe).values():
            already = any(getattr(a, "fused", None) for a in m.attention_modules())
            if not already:  # a model the user fused by hand stays fused on revert
                m.fuse_qkv_projections()
                self.log().call(f"{type(m).__name__} fused projections", m.unfuse_qkv_projections)
