"""Pickle checkpoints (``.bin``, ``.ckpt``): only through ``torch.load(weights_only=True)``.

A pickle can run arbitrary code when loaded, so we never unpickle anything but tensors and plain
containers; a file that needs more is an UnsafeCheckpointError naming it, never a fallback to
an unsafe load. Callers decide *whether* a pickle may be read at all (see checkpoint_files.py).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from .safetensors_io import check_not_lfs_pointer


def load_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a pickled state dict safely (memory-mapped where the zip format allows)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    check_not_lfs_pointer(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors, which only an "
            f"unsafe load (weights_only=False) could read; convert it to safetensors from a trusted "
            f"environment. Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable pickle checkpoint (truncated or corrupt?): {exc}") from None
    # Original-SD ``.ckpt`` files wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return obj
