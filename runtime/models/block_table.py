"""The one table from config block-type strings (``"CrossAttnDownBlock2D"``) to our classes.

Adding a block type is one line: ``register(MyBlock)`` (the config string is the class name) or
``register(MyBlock, "OtherName")``. ``build_block`` passes each class only the keyword arguments
its ``__init__`` takes, so a model hands every block the same keyword set (diffusers'
``get_down_block`` arguments) and no per-type branches are needed.
"""
from __future__ import annotations

import inspect

from .errors import ConfigError
from .unet_2d_blocks import AttnDownBlock2D, AttnUpBlock2D
from .unet_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D
from .vae_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

BLOCK_TYPES: dict[str, type] = {}


def register(cls: type, name: str | None = None) -> type:
    """Map ``name`` (default: the class name) to ``cls``; returns ``cls`` (usable as a decorator)."""
    BLOCK_TYPES[name or cls.__name__] = cls
    return cls


def block_class(name: str, key: str = "block type") -> type:
    """The class for a config block-type string; a ConfigError naming the valid ones otherwise."""
    try:
        return BLOCK_TYPES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown {key} {name!r}; valid: {', '.join(sorted(BLOCK_TYPES))}") from None


def build_block(name: str, key: str = "block type", **kwargs):
    """Instantiate the block ``name`` with the subset of ``kwargs`` its ``__init__`` accepts."""
    cls = block_class(name, key)
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in params})


for _cls in (DownBlock2D, CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D):
    register(_cls)
for _cls in (AttnDownBlock2D, AttnUpBlock2D, DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D):
    register(_cls)
