"""Fused GroupNorm + SiLU in the UNet's and VAE's resnet blocks (level 1, exact class).

Our C kernels (runtime/kernels/group_norm_drive.h) compute the bf16 calls on a CPU with AVX512-BF16 and the
fp32 calls on one with AVX-512: fp32 statistics, one rounding, one write (eager rounds after the norm and
after the SiLU, and writes the normed intermediate and reads it again). In fp32 the result differs from
eager's by rounding only (at most twice eager's error against fp64: tests/kernels/test_group_norm_cpu.py).
Other calls (other dtypes, non-contiguous, CPUs without the flags) take the eager form. Plugs into
``ResnetBlock2D.norm_silu`` (docs/ARCHITECTURE.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.models.resnet import ResnetBlock2D, group_norm_silu

from .slots import CpuKernelSlotPass


def cpu_group_norm_silu_step(norm, x):
    """Our CPU kernel where it supports the call, the eager form where it does not."""
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

        bf16, fp32 = cpu_group_norm_ready(torch.bfloat16), cpu_group_norm_ready(torch.float32)
        return None if bf16 is None or fp32 is None else bf16
