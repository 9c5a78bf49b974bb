"""Write a model folder atomically: everything goes into a temporary sibling, then renames.

A crash at any point leaves the target folder absent or exactly as it was before (config and
weights of the previous save), never a mix. Files in an existing folder that are not this save's
family (another variant's weights, a README) are carried over as hard links; this family's old
files (old shards, an old single file, an index, a pickle of the same name) are not, so nothing
stale lingers. The swap is two renames (old -> backup, new -> target); a crash between them
leaves the target absent and the backup beside it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from . import safetensors_io
from .checkpoint_files import WeightNames
from .files import atomic_write_text


def _carry_over(old: Path, new: Path, names: WeightNames, config_name: str) -> None:
    for entry in old.iterdir():
        if entry.name == config_name or names.is_own_file(entry.name):
            continue
        dest = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def write_weights(
    folder: Path, tensors: dict[str, torch.Tensor], names: WeightNames, max_shard_size: int | str, safe: bool,
    save_function=None,
) -> list[str]:
    """Write ``tensors`` (already prepared) as one file or shards + index; returns the file names.

    ``save_function(shard, path)`` replaces ``torch.save`` for pickle files."""
    single = names.safetensors if safe else names.pickle
    plan = safetensors_io.plan_shards(tensors, safetensors_io.parse_size(max_shard_size), single)
    written = []
    for filename, keys in plan.items():
        shard = {k: tensors[k] for k in keys}
        if safe:
            safetensors_io.write_safetensors(shard, folder / filename)
        else:
            (save_function or torch.save)(shard, folder / filename)
        written.append(filename)
    if len(plan) > 1:
        index = names.safetensors_index if safe else names.pickle_index
        atomic_write_text(folder / index, safetensors_io.index_json(plan, tensors))
        written.append(index)
    return written


def save_folder(
    save_directory: str | os.PathLike,
    write_config,
    tensors: dict[str, torch.Tensor],
    names: WeightNames,
    *,
    config_name: str,
    max_shard_size: int | str,
    safe: bool,
    save_function=None,
) -> Path:
    """Write config (via ``write_config(folder)``) and weights into ``save_directory`` atomically."""
    target = Path(save_directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_pretrained: {target} exists and is not a folder")
    safetensors_io.parse_size(max_shard_size)  # a bad size fails before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        if target.is_dir():
            _carry_over(target, tmp, names, config_name)
        write_config(tmp)
        write_weights(tmp, tensors, names, max_shard_size, safe, save_function)
        _fsync_dir(tmp)
        if target.is_dir():
            cwd = _cwd_inside(target)
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, backup)
            os.rename(tmp, target)
            if cwd is not None:  # the process sat in the old folder: follow it to the new one
                os.chdir(cwd if cwd.is_dir() else target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _cwd_inside(target: Path) -> Path | None:
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        return None
    return cwd if cwd == target or target in cwd.parents else None


def _fsync_dir(folder: Path) -> None:
    """Flush the new files' data before the rename makes them visible (power loss safety)."""
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
