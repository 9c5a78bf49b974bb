"""What ``step`` returns, with diffusers' ``BaseOutput`` behaviour.

An output is a dataclass and an ordered dict at once: ``out.prev_sample``,
``out["prev_sample"]``, ``out[0]``, ``keys()`` / ``values()`` / ``items()`` and ``to_tuple()``.
Fields that are None are not keys and are skipped by position, as in diffusers (runtime/models/outputs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.models.outputs import BaseOutput


@dataclass
class SchedulerOutput(BaseOutput):
    """The next sample and, where the scheduler has one, its x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """LCM's step output: ``denoised`` is the consistency estimate of x0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


# diffusers' per-scheduler names for the same record
DDIMSchedulerOutput = DDPMSchedulerOutput = EulerDiscreteSchedulerOutput = SchedulerOutput
EulerAncestralDiscreteSchedulerOutput = HeunDiscreteSchedulerOutput = LMSDiscreteSchedulerOutput = SchedulerOutput
