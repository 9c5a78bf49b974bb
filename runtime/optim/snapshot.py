"""Keep a module's tensors so a pass that converts them (dtype, memory format) reverts exactly.

``module.to(...)`` swaps each parameter's ``.data`` and reassigns each buffer; holding the old
tensors costs no copy, and putting them back restores the module bit for bit, with the same
Parameter objects (so references held elsewhere stay valid).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TensorSnapshot:
    params: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def take(cls, module: torch.nn.Module) -> "TensorSnapshot":
        snap = cls()
        for p in module.parameters():
            snap.params.append((p, p.data))
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None:
                    snap.buffers.append((sub, name, buf))
        return snap

    def restore(self) -> None:
        for p, data in self.params:
            p.data = data
        for sub, name, buf in self.buffers:
            sub._buffers[name] = buf
