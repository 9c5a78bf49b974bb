"""The step context: which denoising step a model is being called for (docs/ARCHITECTURE.md §3).

The pipeline announces each step before calling the model (index, count, timestep as a Python
number, and whether the batch holds classifier-free guidance's [unconditional, conditional]
halves), so passes never search the schedule or call ``.item()``. The context is per thread:
concurrent calls on one pipeline run in different threads and each sees its own step.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class StepContext:
    index: int  # 0-based step of this call's denoising loop
    count: int  # number of steps in this call's loop
    timestep: float  # the scheduler's timestep as a Python number
    guided: bool = False  # the batch is [unconditional, conditional] halves (classifier-free guidance)


class StepAnnouncer:
    """Holds the current StepContext per thread; ModelMixin owns one per model."""

    def __init__(self):
        self._local = threading.local()

    def set(self, ctx: StepContext | None) -> None:
        self._local.ctx = ctx

    def get(self) -> StepContext | None:
        return getattr(self._local, "ctx", None)

    def __deepcopy__(self, memo):  # a copied model starts with no announced step
        return StepAnnouncer()

    def __reduce__(self):
        return (StepAnnouncer, ())
