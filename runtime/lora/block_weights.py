"""Per-block adapter weights, expanded and looked up with diffusers' rules (``set_adapters``).

A UNet weight may be a number or a dict such as ``{"down": 0.9, "mid": 1.0, "up": {"block_0": 0.6,
"block_1": [0.4, 0.8, 1.0]}}``. It is expanded over the blocks that hold attentions (down blocks
have ``layers_per_block`` transformers each, up blocks one more): a number for "down" / "up" covers
each such block, a number for a block covers each of its transformers, a list gives one value per
transformer (a one-element list is repeated); what is not named gets the default (1.0). The result
maps transformer modules to weights: ``{"down_blocks.1.attentions.0": 0.9, ..., "mid_block.attentions.0":
1.0, "up_blocks.1.attentions.2": 1.0}``; a block without attentions named under "down" / "up" is
ignored (with a warning), "mid" on a UNet without mid attentions is an error.

A layer then takes the first entry whose module name is part of the layer's path; a layer outside
the transformers (a resnet's convolution, a sampler) takes the entry of attention ``<i>`` of its own
block, where ``<i>`` is the layer's index inside that block's resnets / samplers, or 1.0 without one,
as diffusers does. Layers too near the root for that (``conv_in``, ``time_embedding.linear_1``) get 1.0.
"""
from __future__ import annotations

import copy
import logging

from runtime.models.errors import LoraError

logger = logging.getLogger(__name__)


def _block_name(name: str) -> str:
    """``"mid"`` -> ``"mid_block.attentions.0"``; ``"down.block_1.0"`` -> ``"down_blocks.1.attentions.0"``."""
    if name == "mid":
        return "mid_block.attentions.0"
    updown, block, index = name.split(".")
    return f"{updown}_blocks.{block.removeprefix('block_')}.attentions.{index}"


def _expand_one(scales, blocks: dict, per_block: dict, names: list[str], default: float):
    if not isinstance(scales, dict):
        return scales
    scales = copy.deepcopy(scales)
    unknown = sorted(set(scales) - {"down", "mid", "up"})
    if unknown:
        raise LoraError(f"set_adapters: per-block weights take the keys 'down', 'mid' and 'up', got {unknown}")
    mid = scales.get("mid", default)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise LoraError(f"set_adapters: expected 1 weight for mid, got {len(mid)}")
        mid = mid[0]
    flat = {"mid": mid}
    for updown in ("down", "up"):
        part = scales.get(updown, default)
        if not isinstance(part, dict):
            part = {f"block_{i}": copy.deepcopy(part) for i in blocks[updown]}
        for i in blocks[updown]:
            value = part.get(f"block_{i}", default)
            count = per_block[updown]
            if not isinstance(value, list):
                value = [value] * count
            elif len(value) == 1:
                value = value * count
            elif len(value) != count:
                raise LoraError(f"set_adapters: expected {count} weights for {updown}.block_{i}, got {len(value)}")
            for j, v in enumerate(value):
                flat[f"{updown}.block_{i}.{j}"] = v
        ignored = sorted(k for k in part if k not in {f"block_{i}" for i in blocks[updown]})
        if ignored:  # diffusers drops these silently; say so
            logger.warning("set_adapters: per-block weights for %s %s ignored: those blocks hold no attentions",
                           updown, ", ".join(ignored))
    out = {}
    for name, value in flat.items():
        try:
            module = _block_name(name)
        except ValueError:
            raise LoraError(f"set_adapters: cannot read the per-block weight name {name!r}") from None
        if not any(module in n for n in names):
            shown = name.rsplit(".", 1)[0] if name != "mid" else name
            raise LoraError(f"set_adapters: cannot set a LoRA weight for {shown!r}: this UNet has no such block, "
                            "or it holds no attentions")
        out[module] = value
    return out


def expand_unet_weights(unet, weights: list, default: float = 1.0) -> list:
    """Each adapter's UNet weight, a number or diffusers' per-block dict, expanded (see the module docstring)."""
    if not any(isinstance(w, dict) for w in weights):
        return list(weights)
    blocks = {"down": [i for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")],
              "up": [i for i, b in enumerate(unet.up_blocks) if hasattr(b, "attentions")]}
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise LoraError(f"set_adapters: per-block weights need an int layers_per_block; this UNet has {layers!r}")
    per_block = {"down": layers, "up": layers + 1}
    names = [n for n, _ in unet.named_parameters()]
    return [_expand_one(w, blocks, per_block, names, default) for w in weights]


def module_weight(weight, path: str) -> float:
    """The weight one layer at ``path`` takes from an adapter's (expanded) weight."""
    if not isinstance(weight, dict):
        return float(weight)
    for module, value in weight.items():
        if module in path:
            return float(value)
    parts = path.split(".")
    if len(parts) < 4:
        return 1.0
    return float(weight.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0))
