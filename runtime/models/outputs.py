"""Model output records with diffusers' access patterns: ``out.sample``, ``out[0]``, ``out["sample"]``."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class ModelOutput:
    """A dataclass that also indexes like a tuple (by position) and a dict (by field name)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(dataclasses.fields(self))


@dataclasses.dataclass
class DecoderOutput(ModelOutput):
    sample: torch.Tensor


@dataclasses.dataclass
class AutoencoderKLOutput(ModelOutput):
    latent_dist: Any  # DiagonalGaussianDistribution


@dataclasses.dataclass
class UNet2DOutput(ModelOutput):
    sample: torch.Tensor
