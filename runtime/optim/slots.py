"""A pass that puts one of our CPU kernels into a model's callable slot (docs/ARCHITECTURE.md §3).

Subclasses name the module type, the slot, the callable to put there and the kernel's readiness;
``apply`` sets the slot on every such module of the pipeline's models and ``revert`` puts back
what was there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from .base import Pass
from .components import pipeline_device, pipeline_models


@dataclass(frozen=True)
class CpuKernelSlotPass(Pass):
    module_type: ClassVar[type]
    slot: ClassVar[str]
    what: ClassVar[str]  # the modules, in words, for the skip reason

    def kernel(self) -> Callable:
        raise NotImplementedError

    def ready(self) -> str | None:
        raise NotImplementedError

    def _modules(self, pipe):
        return [m for model in pipeline_models(pipe).values() for m in model.modules() if isinstance(m, self.module_type)]

    def supports(self, pipe) -> str | None:
        if not self._modules(pipe):
            return f"no {self.what} in this pipeline"
        if pipeline_device(pipe).type != "cpu":
            return f"the fused {self.what} is a CPU kernel; this pipeline is on {pipeline_device(pipe)}"
        return self.ready()

    def apply(self, pipe) -> None:
        slotted = self._state().setdefault("slotted", [])
        for module in self._modules(pipe):
            self.log().set(module, self.slot, self.kernel())
            slotted.append(module)
