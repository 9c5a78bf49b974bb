"""What ``step`` returns, with diffusers' ``BaseOutput`` behaviour.

An output is a dataclass and an ordered dict at once: ``out.prev_sample``,
``out["prev_sample"]``, ``out[0]``, ``keys()`` / ``values()`` / ``items()`` and ``to_tuple()``.
Fields that are None are not keys and are skipped by position, as in diffusers.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch


class StepOutput(OrderedDict):
    """Base of the step outputs (subclasses are dataclasses); read-only as a dict."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def __setattr__(self, name, value) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} does not support removing or bulk-updating keys")

    __delitem__ = setdefault = pop = popitem = update = _refuse  # type: ignore[assignment]

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple:
        """The values that are not None, in field order."""
        return tuple(self[k] for k in self.keys())


@dataclass
class SchedulerOutput(StepOutput):
    """The next sample and, where the scheduler has one, its x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class LCMSchedulerOutput(StepOutput):
    """LCM's step output: ``denoised`` is the consistency estimate of x0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


# diffusers' per-scheduler names for the same record
DDIMSchedulerOutput = DDPMSchedulerOutput = EulerDiscreteSchedulerOutput = SchedulerOutput
EulerAncestralDiscreteSchedulerOutput = HeunDiscreteSchedulerOutput = LMSDiscreteSchedulerOutput = SchedulerOutput
