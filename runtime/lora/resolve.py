"""Find the layer each parsed LoRA layer adapts, and check it fits, before anything is attached.

Every problem is a ``LoraError`` naming the file's key: the first key whose module the model lacks
(with the format family the file looks like and the closest module name the model has), a module
that is not a linear or convolution, and a shape that does not fit (both shapes).
"""
from __future__ import annotations

import difflib
from typing import Mapping

from torch import nn

from runtime.models.errors import LoraError
from runtime.models.layers import Conv2d, Linear

from .weights import LoraLayer

TEXT_MODEL = "text_model."


def lora_family(state_dict: Mapping | None) -> str:
    """The format family a file looks like (``runtime.lora.formats.lora_family`` when it offers one)."""
    from . import formats

    family = getattr(formats, "lora_family", None)
    if family is not None and state_dict is not None:
        try:
            return str(family(state_dict))
        except Exception:  # a guess for an error message must not hide the error itself
            pass
    return "PEFT/diffusers"


def key_for(component: str, path: str, state_dict: Mapping | None, part: str = "A") -> str:
    """The file's key for a layer's down (``part="A"``) or up, as well as it can be told."""
    candidates = [f"{component}.{path}.lora_{part}.weight", f"{path}.lora_{part}.weight"]
    if path.startswith(TEXT_MODEL):
        bare = path[len(TEXT_MODEL):]
        candidates += [f"{component}.{bare}.lora_{part}.weight", f"{bare}.lora_{part}.weight"]
    for key in candidates:
        if state_dict is not None and key in state_dict:
            return key
    kohya = "lora_down" if part == "A" else "lora_up"
    return f"{component}.{path} ({kohya})"


def _find(modules: dict, path: str) -> tuple[str, nn.Module] | None:
    if path in modules:
        return path, modules[path]
    # CLIP text encoders: transformers 5 names modules without the ``text_model.`` level; ours have it
    if TEXT_MODEL + path in modules:
        return TEXT_MODEL + path, modules[TEXT_MODEL + path]
    if path.startswith(TEXT_MODEL) and path[len(TEXT_MODEL):] in modules:
        return path[len(TEXT_MODEL):], modules[path[len(TEXT_MODEL):]]
    return None


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        return (f"Conv2d {layer.in_channels}->{layer.out_channels}, kernel {tuple(layer.kernel_size)}")
    return f"Linear {layer.in_features}->{layer.out_features}"


def _check_shapes(layer: nn.Module, lora: LoraLayer, source: str, target: str, key_a: str, key_b: str) -> None:
    down, up = lora.down, lora.up
    rank = int(down.shape[0]) if down.ndim else 0
    what = f"{target} ({_describe(layer)})"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise LoraError(f"{source}: LoRA key {key_a!r}: {what} is a grouped convolution (groups={layer.groups}); "
                            "LoRA on it is not supported")
        need_down = (rank, layer.in_channels, *layer.kernel_size)
        need_up = (layer.out_channels, rank, 1, 1)
    else:
        need_down = (rank, layer.in_features)
        need_up = (layer.out_features, rank)
    for key, t, need in ((key_a, down, need_down), (key_b, up, need_up)):
        if tuple(t.shape) != need:
            raise LoraError(f"{source}: LoRA key {key!r} has shape {tuple(t.shape)} but {what} needs {need} for a "
                            f"rank-{rank} LoRA")
        if not t.is_floating_point():
            raise LoraError(f"{source}: LoRA key {key!r} is {t.dtype}; LoRA weights must be floating point")


def resolve_layers(model: nn.Module, component: str, layers: Mapping[str, LoraLayer], *,
                   state_dict: Mapping | None = None, source: str = "the LoRA state dict") -> dict[str, tuple]:
    """``{module path: (layer, LoraLayer)}`` in file order, module paths as the model names them.

    Missing modules are looked for first, over the whole file (a LoRA for another architecture is named
    as such, not by whichever shape happens to differ first), then each layer's type and shapes."""
    modules = dict(model.named_modules())
    found = {}
    for path in layers:
        hit = _find(modules, path)
        if hit is None:
            key = layers[path].key or key_for(component, path, state_dict, "A")
            adaptable = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            close = difflib.get_close_matches(path, adaptable, n=1, cutoff=0.0)
            raise LoraError(
                f"{source}: LoRA key {key!r} matches no module of the {component} ({type(model).__name__}): it has "
                f"no {path!r}. The file looks like a {lora_family(state_dict)} LoRA for another architecture or "
                f"component" + (f"; the closest module here is {close[0]!r}" if close else ""))
        found[path] = hit
    out: dict[str, tuple] = {}
    for path, lora in layers.items():
        name, layer = found[path]
        key_a, key_b = key_for(component, path, state_dict, "A"), key_for(component, path, state_dict, "B")
        if lora.key:  # the file's own name for the down weight (Kohya, older diffusers)
            key_a = lora.key
        if not isinstance(layer, (Conv2d, Linear)):
            raise LoraError(f"{source}: LoRA key {key_a!r} targets {component}.{name}, a {type(layer).__name__}; "
                            "LoRA adapts linear and convolution layers only")
        _check_shapes(layer, lora, source, f"{component}.{name}", key_a, key_b)
        if name in out:
            raise LoraError(f"{source}: two LoRA layers target {component}.{name} ({key_a!r})")
        out[name] = (layer, lora)
    return out
