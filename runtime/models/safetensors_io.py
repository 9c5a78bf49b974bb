"""Safetensors files: validate before reading, memory-map, write shards and their index.

A safetensors file is ``u64 little-endian header length | JSON header | raw tensor bytes``; the
header maps each tensor name to ``dtype``, ``shape`` and ``data_offsets`` into the byte block.
We check that layout ourselves first, so a truncated download or a Git LFS pointer is an error
naming the file and what is wrong, not a cryptic failure deep inside the reader.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from .errors import CheckpointError, CheckpointNotFoundError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
# A header larger than this is not a real checkpoint header (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
SAVE_METADATA = {"format": "pt"}


def check_not_lfs_pointer(path: Path) -> None:
    """A Git LFS pointer (a small text file) where weights should be: say so and how to fix it."""
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        raise CheckpointError(
            f"{path}: this is a Git LFS pointer file, not the weights (the repository was cloned "
            f"without its LFS objects); run `git lfs pull` in the checkout to fetch them"
        )


def read_header(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's framing and return its JSON header (``__metadata__`` kept)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    check_not_lfs_pointer(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, less than the 8-byte header length)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: the header claims {header_len} bytes "
                f"but the file has only {size - 8} bytes after the length field"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object)")
    data_bytes = size - 8 - header_len
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has no data_offsets") from None
        if not all(type(v) is int for v in (start, end)) or not 0 <= start <= end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets "
                                  f"{info['data_offsets']!r}; expected two integers 0 <= start <= end")
        needed = max(needed, end)
    if needed > data_bytes:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its tensors need {needed} data bytes "
            f"but the file holds only {data_bytes} (an interrupted download or copy?)"
        )
    return header


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of one file on the CPU; safetensors memory-maps the file."""
    from safetensors.torch import load_file

    path = Path(path)
    read_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # the reader's own validation (dtype/shape vs. offsets, ...)
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file with ``{"format": "pt"}`` metadata (diffusers and transformers expect it),
    plus ``metadata`` (strings) when given (a LoRA file's ``lora_adapter_metadata``)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={**SAVE_METADATA, **(metadata or {})})
    except Exception as exc:  # the Rust writer's I/O errors (a full disk: "os error 28") are no OSError
        found = re.search(r"os error (\d+)", str(exc))
        if isinstance(exc, OSError) or not found:
            raise
        raise OSError(int(found.group(1)), f"{os.strerror(int(found.group(1)))}: writing {path} ({exc})") from exc


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``*.index.json`` and return its weight_map (tensor name -> shard file name)."""
    path = Path(path)
    check_not_lfs_pointer(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid sharded-checkpoint index (not valid JSON: {exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: invalid sharded-checkpoint index: no 'weight_map' object")
    return {str(k): str(v) for k, v in weight_map.items()}


def shard_files(index_path: Path) -> list[Path]:
    """The shard files an index names, in order; a missing shard is an error naming it and the index."""
    weight_map = read_index(index_path)
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if Path(n).name != n or n in (".", "..")]
    if outside:
        raise CheckpointError(f"{index_path}: shard names must be plain file names beside the index: {', '.join(outside)}")
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{index_path}: the index names shard file(s) that are not in {index_path.parent}: {', '.join(missing)}"
        )
    return [index_path.parent / n for n in names]


# ---- sizes and sharding -----------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5MB"`` -> 5_000_000, ``"2GiB"`` -> 2**31, an int stays; as huggingface_hub counts."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size: cannot read {size!r} as a size (use an int or e.g. '5MB', '10GB')")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int, filename: str) -> dict[str, list[str]]:
    """Greedy split in key order into shards of at most ``max_bytes`` (a larger tensor gets its own).

    ``filename`` is the single-file name (``diffusion_pytorch_model.fp16.safetensors``); shards
    are named as diffusers and transformers name them: ``<stem>-00001-of-00003.safetensors``.
    """
    groups: list[list[str]] = [[]]
    used = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and used + nbytes > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += nbytes
    if len(groups) == 1:
        return {filename: groups[0]}
    stem, ext = filename.rsplit(".", 1)
    count = len(groups)
    return {f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}": keys for i, keys in enumerate(groups)}


def index_json(plan: dict[str, list[str]], tensors: dict[str, torch.Tensor]) -> str:
    """The ``*.index.json`` text for a sharded save (total_size metadata, as the hub tools write)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {key: name for name, keys in plan.items() for key in keys}
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


def prepare_for_save(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no two sharing storage (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        if tensor.is_meta:
            raise CheckpointError(f"cannot save {key!r}: it is still on the meta device (never loaded)")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # tied weights or a view into a larger buffer: store a compact copy
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out
