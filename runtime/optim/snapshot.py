"""Keep a module's tensors so a pass that converts them (dtype, memory format) reverts exactly.

``module.to(...)`` swaps each parameter's ``.data`` and reassigns each buffer; holding the old
tensors costs no copy, and putting them back restores the module bit for bit, with the same
Parameter objects (so references held elsewhere stay valid).

Snapshots not yet restored are listed by ``live_snapshots()``: code that edits weights in place for
good (``fuse_lora``, runtime/lora/fuse.py) edits the tensors a revert would put back too, so the
edit survives the revert.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

_live: "weakref.WeakSet[TensorSnapshot]" = weakref.WeakSet()


def live_snapshots() -> list["TensorSnapshot"]:
    """Snapshots taken and not restored yet (held by some undo log)."""
    return list(_live)


@dataclass(eq=False)  # compared by identity: snapshots live in a WeakSet
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
        _live.add(snap)
        return snap

    def restore(self) -> None:
        for p, data in self.params:
            p.data = data
        for sub, name, buf in self.buffers:
            sub._buffers[name] = buf
        _live.discard(self)

    def held(self) -> dict[int, torch.Tensor]:
        """``id(parameter) -> tensor`` this snapshot puts back on restore."""
        return {id(p): data for p, data in self.params}
