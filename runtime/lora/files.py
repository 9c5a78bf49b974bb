"""Where a LoRA comes from: a state dict, a file, a folder or a hub id (diffusers' lookup rules).

``fetch`` returns the state dict (a new dict: a caller's dict is never mutated), the safetensors
metadata (``__metadata__``, where diffusers keeps ``lora_adapter_metadata``) and a description of
the source for error messages. Folders and hub snapshots are searched as diffusers searches them:
``weight_name`` if given, else ``pytorch_lora_weights.safetensors``, else the one ``.safetensors``
file there (not scheduler / optimizer / checkpoint files), else the pickles the same way, read only
through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from runtime.models.errors import CheckpointNotFoundError, LoraError
from runtime.models.hub import HUB_KWARGS, _looks_like_hub_id, resolve_folder

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
_NOT_LORA_FILES = ("scheduler", "optimizer", "checkpoint")


def _best_guess(folder: Path, extension: str) -> str | None:
    names = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(extension)
                   and not any(s in f.name for s in _NOT_LORA_FILES))
    if not names:
        return None
    default = LORA_WEIGHT_NAME_SAFE if extension == ".safetensors" else LORA_WEIGHT_NAME
    if default in names:
        return default
    if len(names) > 1:
        logger.warning("%s holds more than one %s file; loading %s (pass weight_name= to pick another): %s",
                       folder, extension, names[0], ", ".join(names))
    return names[0]


def _read(path: Path) -> tuple[dict, dict | None]:
    if path.suffix == ".safetensors":
        from runtime.models.safetensors_io import load_safetensors, read_header

        metadata = read_header(path).get("__metadata__") or None
        return dict(load_safetensors(path)), metadata
    from runtime.models.pickle_io import load_pickle

    return dict(load_pickle(path)), None


def _in_folder(folder: Path, weight_name: str | None, use_safetensors: bool | None, where: str) -> Path:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise CheckpointNotFoundError(f"{where}: no LoRA file {weight_name!r} in {folder}")
        return path
    extensions = [".safetensors"] if use_safetensors else [".safetensors", ".bin"]
    if use_safetensors is False:
        extensions = [".bin", ".safetensors"]
    for ext in extensions:
        name = _best_guess(folder, ext)
        if name is not None:
            return folder / name
    raise CheckpointNotFoundError(f"{where}: no LoRA weights file (*.safetensors or *.bin) in {folder}; "
                                  "pass weight_name= to name it")


def fetch(source, weight_name: str | None = None, subfolder: str | None = None, use_safetensors: bool | None = None,
          **hub_kwargs) -> tuple[dict, Mapping[str, str] | None, str]:
    """``(state_dict, safetensors metadata or None, what it was)`` for a dict, file, folder or hub id."""
    if isinstance(source, Mapping):
        return dict(source), None, "the LoRA state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise LoraError(f"a LoRA is a state dict, a file, a folder or a hub id; got {type(source).__name__}")
    hub = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
    path = Path(source).expanduser()
    if path.is_file():
        return (*_read(path), str(path))
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointNotFoundError(f"{source}: no subfolder {subfolder!r}")
        file = _in_folder(folder, weight_name, use_safetensors, str(source))
        return (*_read(file), str(file))
    if not _looks_like_hub_id(str(source)):
        raise CheckpointNotFoundError(f"LoRA file or folder not found: {source}")
    patterns = [weight_name] if weight_name else ["*.safetensors"] if use_safetensors else ["*.safetensors", "*.bin"]
    folder = resolve_folder(str(source), subfolder, allow_patterns=patterns, **hub)
    file = _in_folder(folder, weight_name, use_safetensors, str(source))
    return (*_read(file), f"{source} ({file.name})")


def check_lora_keys(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """A file without a single LoRA key (a full checkpoint, an embedding) is a clear error, not a parse failure."""
    if not state_dict:
        raise LoraError(f"{where}: the LoRA file is empty (no tensors)")
    if not any("lora" in k.lower() for k in state_dict):
        keys = list(state_dict)
        hint = ""
        if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys) or len(keys) == 1:
            hint = " It looks like a textual-inversion embedding: load it with load_textual_inversion."
        raise LoraError(f"{where}: no LoRA keys among its {len(keys)} tensor(s) (first: {keys[0]!r}); expected keys "
                        "such as 'unet.<module>.lora_A.weight' or 'lora_unet_<module>.lora_down.weight'." + hint)
