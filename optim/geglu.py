"""Fused GEGLU feed-forward: the projection and ``value * gelu(gate)`` in one kernel (level 1, exact class).

On a CPU with AVX512-BF16, bf16 calls run our linear+GEGLU kernel (kernels/linear_geglu_cpu.c): the
products with fp32 sums, the bias and the erf GELU on those sums, one rounding; the (rows, 2d)
projection is never written (1.1-1.3x faster than oneDNN's linear plus the activation kernel on the
SD UNets' shapes, and closer to fp32). Its packed weight is made on first use and again when the
weight changes (prepack's rule). Calls it does not take (compiling, autograd) run the projection,
then our activation kernel (kernels/geglu_cpu.c: one read of the projection, one rounding; eager
rounds twice). fp32 calls take the eager formula, so an fp32 pipeline computes exactly what it did.
On a CPU with AMX tiles the projection stays with oneDNN's linear, whose tile matmuls are expected to
be faster (optim/hardware.py; ``amx=True`` fuses anyway); the activation kernel, bound by memory, runs.
Plugs into ``GEGLU.fused`` and ``GEGLU.activation`` (DESIGN.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.transformer_2d import GEGLU, geglu_activation

from .hardware import AMX_REASON, cpu_has_amx
from .prepack import weight_cache
from .slots import CpuKernelSlotPass


def cpu_geglu_activation(proj):
    """Our bf16 CPU kernel where it supports the call, the eager formula where it does not."""
    from kernels.geglu_cpu import try_cpu_geglu

    out = try_cpu_geglu(proj)
    return out if out is not None else geglu_activation(proj)


def fused_linear_geglu(module: GEGLU):
    """A ``fused`` slot for ``module``: its bf16 CPU calls through our linear+GEGLU kernel, None for the rest."""
    from kernels.linear_geglu_cpu import linear_geglu_launch, linear_geglu_weight

    linear, cache = module.proj, {}

    def fused(x: torch.Tensor) -> torch.Tensor | None:
        w = linear.weight
        if (torch.compiler.is_compiling() or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16
                or x.device.type != "cpu" or x.ndim < 1 or x.shape[-1] != w.shape[1]
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return None
        entry = weight_cache(cache, w)
        if "packed" not in entry:
            entry["packed"] = linear_geglu_weight(w)
            entry["bias"] = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).contiguous()
        return linear_geglu_launch(x, entry["packed"], entry["bias"])

    fused.packed_cache = cache
    return fused


def _fusable(module: GEGLU) -> bool:
    """Whether the kernel takes the module's shapes: an even input width, an output width a multiple of 16."""
    return module.proj.in_features % 2 == 0 and module.proj.out_features % 32 == 0


@dataclass(frozen=True)
class GEGLUPass(CpuKernelSlotPass):
    name = "geglu"
    exact = True
    module_type = GEGLU
    slot = "activation"
    what = "GEGLU feed-forward"
    # Fuse the projection on CPUs with AMX tiles too (see the module docstring).
    amx: bool = False

    def kernel(self):
        return cpu_geglu_activation

    def ready(self) -> str | None:
        from kernels.geglu_cpu import cpu_geglu_ready

        return cpu_geglu_ready()

    def apply(self, pipe) -> None:
        super().apply(pipe)
        from kernels.linear_geglu_cpu import cpu_linear_geglu_ready

        fused = self._state().setdefault("fused", [])
        if cpu_linear_geglu_ready() is None and (self.amx or not cpu_has_amx()):
            for module in self._modules(pipe):
                if _fusable(module):
                    fused.append((module, module.fused))
                    module.fused = fused_linear_geglu(module)

    def describe(self) -> str:
        fused, total = len(self._state().get("fused", [])), len(self._state().get("previous", []))
        text = f"{total} GEGLU activations fused, {fused} of them with their projection (bf16 calls)"
        return text + (f"; projections left to oneDNN: {AMX_REASON}" if not self.amx and cpu_has_amx() else "")

    def revert(self, pipe) -> None:
        for module, previous in reversed(self._state().pop("fused", [])):
            module.fused = previous
        super().revert(pipe)
