"""Fused GroupNorm + SiLU in the UNet's and VAE's resnet blocks (level 1, exact class).

On a CPU with AVX512-BF16 our C kernel (kernels/group_norm_cpu.c) computes the bf16 calls: fp32
statistics, one rounding, one write (eager rounds after the norm and after the SiLU and writes the
normed intermediate). Other calls (fp32, non-contiguous) take the eager form, so an fp32 pipeline
computes exactly what it did. Plugs into ``ResnetBlock2D.norm_silu`` (DESIGN.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

from models.resnet import ResnetBlock2D, group_norm_silu

from .base import Pass
from .components import pipeline_device, pipeline_models


def cpu_group_norm_silu_step(norm, x):
    """Our bf16 CPU kernel where it supports the call, the eager form where it does not."""
    from kernels.group_norm_cpu import cpu_group_norm_silu, cpu_group_norm_supports

    if cpu_group_norm_supports(x, norm.num_groups, norm.weight, norm.bias) is None:
        return cpu_group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return group_norm_silu(norm, x)


@dataclass(frozen=True)
class GroupNormPass(Pass):
    name = "group_norm"
    exact = True

    def _blocks(self, pipe):
        return [m for model in pipeline_models(pipe).values() for m in model.modules() if isinstance(m, ResnetBlock2D)]

    def supports(self, pipe) -> str | None:
        if not self._blocks(pipe):
            return "no resnet blocks in this pipeline"
        if pipeline_device(pipe).type != "cpu":
            return f"the fused GroupNorm+SiLU is a CPU kernel; this pipeline is on {pipeline_device(pipe)}"
        from kernels.group_norm_cpu import cpu_group_norm_ready

        return cpu_group_norm_ready()

    def apply(self, pipe) -> None:
        saved = self._state().setdefault("previous", [])
        for block in self._blocks(pipe):
            saved.append((block, block.norm_silu))
            block.norm_silu = cpu_group_norm_silu_step

    def revert(self, pipe) -> None:
        for block, step in reversed(self._state().pop("previous", [])):
            block.norm_silu = step
