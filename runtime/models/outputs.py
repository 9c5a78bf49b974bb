"""Output records with diffusers' ``BaseOutput`` semantics.

A subclass is a ``@dataclass`` whose instance is also an ordered dict of the fields that are
not None: ``out.sample``, ``out["sample"]``, ``out[0]`` / ``out[:1]`` (through ``to_tuple()``,
which skips None fields), ``keys()`` / ``values()`` / ``items()``. Setting a field as an
attribute or as a key updates both views; removing keys (``del``, ``pop``, ``update``,
``setdefault``) is refused, so the dict view never disagrees with the attributes. Iterating
yields the keys, as for any dict: unpack ``out.to_tuple()``, not ``out``.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch
import torch.utils._pytree as _pytree


class BaseOutput(OrderedDict):
    """Dataclass fields as an ordered dict of the non-None ones; indexable by name or position."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A pytree node, so torch's tree utilities (DDP static graphs, export) see through outputs.
        _pytree.register_pytree_node(
            cls,
            _pytree._dict_flatten,
            lambda values, context: cls(**_pytree._dict_unflatten(values, context)),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self)
        if not fields:
            raise ValueError(f"{type(self).__name__} has no fields")
        first = getattr(self, fields[0].name)
        rest_none = all(getattr(self, f.name) is None for f in fields[1:])
        if rest_none and isinstance(first, dict):
            # diffusers' rule: a lone dict as first argument supplies the keys
            for key, value in first.items():
                self[key] = value
            return
        for f in fields:
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def _refuse(self, what: str):
        raise Exception(f"You cannot use ``{what}`` on a {type(self).__name__} instance.")

    def __delitem__(self, *args, **kwargs):
        self._refuse("__delitem__")

    def setdefault(self, *args, **kwargs):
        self._refuse("setdefault")

    def pop(self, *args, **kwargs):
        self._refuse("pop")

    def update(self, *args, **kwargs):
        self._refuse("update")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        if not dataclasses.is_dataclass(self):
            return super().__reduce__()
        factory, _args, *rest = super().__reduce__()
        return (factory, tuple(getattr(self, f.name) for f in dataclasses.fields(self)), *rest)

    def to_tuple(self) -> tuple:
        """The values of the non-None fields, in field order."""
        return tuple(self[k] for k in self.keys())


ModelOutput = BaseOutput  # the name the model modules import


@dataclasses.dataclass
class DecoderOutput(BaseOutput):
    """``sample``: the decoded image, (B, C, H, W)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None  # VQ models' field in diffusers; None for the KL VAE


@dataclasses.dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: Any  # DiagonalGaussianDistribution


@dataclasses.dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor
