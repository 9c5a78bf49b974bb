"""Writing LoRA files diffusers loads: PEFT keys, ``lora_adapter_metadata``, atomic writes.

``get_peft_model_state_dict(model, adapter_name)`` gives one adapter's weights as peft's function of
that name does (``<module>.lora_A.weight`` / ``.lora_B.weight``, no adapter name in the keys), with the
adapter's LoRA config attached (``.lora_metadata``: r, lora_alpha, rank / alpha patterns, target
modules). ``save_lora_weights`` writes ``<prefix>.<key>`` for each component into one safetensors
file whose metadata carries the configs (``lora_adapter_metadata``, JSON keyed ``<prefix>.<field>``),
so diffusers (and we) load the alphas back. Text-encoder keys keep ``text_model.``, which diffusers
strips for transformers 5's flattened CLIP; their target modules are written without it, which
matches either layout (peft matches module names by suffix).
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import torch
from torch import nn

from runtime.models.errors import InputError, LoraError

from .files import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_SAFE
from .state import lora_state

METADATA_KEY = "lora_adapter_metadata"


class LoraStateDict(dict):
    """A dict of LoRA tensors that also carries its adapter's config (``lora_metadata``)."""

    lora_metadata: dict | None = None


def _pick(model: nn.Module, adapter_name: str | None) -> str:
    state = lora_state(model)
    names = list(state.adapters) if state is not None else []
    if not names:
        raise LoraError(f"{type(model).__name__} has no LoRA adapter")
    if adapter_name is None:
        if len(names) == 1:
            return names[0]
        active = [n for n in state.active if n in names]
        if len(active) == 1:
            return active[0]
        raise LoraError(f"{type(model).__name__} holds adapters {names}; name the one to save (adapter_name=)")
    if adapter_name not in names:
        raise LoraError(f"{type(model).__name__} has no adapter {adapter_name!r} (loaded: {names})")
    return adapter_name


def lora_adapter_metadata(model: nn.Module, adapter_name: str | None = None) -> dict:
    """The adapter's LoRA config as peft's ``LoraConfig.to_dict()`` would hold it (the fields that matter)."""
    name = _pick(model, adapter_name)
    state = lora_state(model)
    layers = {path: state.entries[path].adapters[name] for path in state.adapters[name].paths}
    bare = {path: path.removeprefix("text_model.") for path in layers}
    ranks = collections.Counter(a.rank for a in layers.values())
    alphas = collections.Counter(a.alpha for a in layers.values())
    r = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    return {
        "r": int(r),
        "lora_alpha": float(alpha),
        "rank_pattern": {bare[p]: int(a.rank) for p, a in layers.items() if a.rank != r},
        "alpha_pattern": {bare[p]: float(a.alpha) for p, a in layers.items() if a.alpha != alpha},
        "target_modules": sorted(bare.values()),
        "use_dora": False,
        "lora_bias": False,
    }


def get_peft_model_state_dict(model: nn.Module, adapter_name: str | None = None) -> LoraStateDict:
    """One adapter's tensors as loaded (unpadded), keyed as peft keys them; config in ``.lora_metadata``."""
    name = _pick(model, adapter_name)
    state = lora_state(model)
    out = LoraStateDict()
    for path in state.adapters[name].paths:
        a = state.entries[path].adapters[name]
        out[f"{path}.lora_A.weight"] = a.source_down
        out[f"{path}.lora_B.weight"] = a.source_up
    out.lora_metadata = lora_adapter_metadata(model, name)
    return out


def _tensors(layers) -> dict[str, torch.Tensor]:
    if isinstance(layers, nn.Module):
        return dict(layers.state_dict())
    if not isinstance(layers, dict):
        raise InputError(f"save_lora_weights: LoRA layers must be a dict of tensors or a module, got {type(layers).__name__}")
    return dict(layers)


def pack(layers: dict[str, object], metadata: dict[str, dict | None]) -> tuple[dict, dict]:
    """``layers``: prefix -> dict of tensors (or a module); ``metadata``: prefix -> LoRA config or None.
    Returns the prefixed tensors and the prefixed config (diffusers' ``<prefix>.<field>`` keys)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, part in layers.items():
        for key, value in _tensors(part).items():
            if not isinstance(value, torch.Tensor):
                raise InputError(f"save_lora_weights: {prefix}.{key} is a {type(value).__name__}, not a tensor")
            tensors[f"{prefix}.{key}"] = value
    config = {}
    for prefix, meta in metadata.items():
        for key, value in (meta or {}).items():
            config[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    return tensors, config


def write_lora_file(save_directory, tensors: dict[str, torch.Tensor], config: dict | None = None, *,
                    weight_name: str | None = None, safe_serialization: bool = True, save_function=None,
                    is_main_process: bool = True) -> Path | None:
    """Write ``tensors`` (with ``config`` as ``lora_adapter_metadata``) to ``save_directory/weight_name``,
    atomically: a temporary file in the folder, then a rename."""
    if not is_main_process:
        return None
    directory = Path(save_directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"save_lora_weights: {directory} is a file; save_directory must be a folder")
    if config and not safe_serialization:
        raise InputError("save_lora_weights: LoRA adapter metadata needs safe_serialization=True")
    from runtime.models.safetensors_io import prepare_for_save

    tensors = prepare_for_save(dict(tensors))
    directory.mkdir(parents=True, exist_ok=True)
    name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
    path = directory / name
    from runtime.models.files import atomic_file

    with atomic_file(path) as tmp:
        if save_function is not None:
            save_function(tensors, str(tmp))
        elif safe_serialization:
            from runtime.models.safetensors_io import write_safetensors

            extra = {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)} if config else None
            write_safetensors(tensors, tmp, metadata=extra)
        else:
            torch.save(tensors, tmp)
    return path
