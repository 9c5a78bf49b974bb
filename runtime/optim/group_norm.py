"""Fused GroupNorm + SiLU in the UNet's and VAE's resnet blocks (level 1, exact class).

On a CPU with AVX512-BF16 our C kernel (runtime/kernels/group_norm_cpu.c) computes the bf16 calls: fp32
statistics, one rounding, one write (eager rounds after the norm and after the SiLU and writes the
normed intermediate). Other calls (fp32, non-contiguous) take the eager form, so an fp32 pipeline
computes exactly what it did. Plugs into ``ResnetBlock2D.norm_silu`` (docs/ARCHITECTURE.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.models.resnet import ResnetBlock2D, group_norm_silu

from .slots import CpuKernelSlotPass


def cpu_group_norm_silu_step(norm, x):
    """Our bf16 CPU kernel where it supports the call, the eager form where it does not."""
    from runtime.kernels.group_norm_cpu import try_cpu_group_norm_silu

    out = try_cpu_group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return out if out is not None else group_norm_silu(norm, x)


@dataclass(frozen=True)
class GroupNormPass(CpuKernelSlotPass):
    name = "group_norm"
    exact = True
    module_type = ResnetBlock2D
    slot = "norm_silu"
    what = "GroupNorm+SiLU of resnet blocks"

    def kernel(self):
        return cpu_group_norm_silu_step

    def ready(self) -> str | None:
        from runtime.kernels.group_norm_cpu import cpu_group_norm_ready

        return cpu_group_norm_ready()
