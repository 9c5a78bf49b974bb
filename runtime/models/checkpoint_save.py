"""Write a model folder atomically: everything goes into a temporary sibling, then renames.

A crash at any point leaves the target folder absent or exactly as it was before (config and
weights of the previous save), never a mix. Files in an existing folder that are not this save's
family (another variant's weights, a README) are carried over as hard links; this family's old
files (old shards, an old single file, an index, a pickle of the same name) are not, so nothing
stale lingers. The swap is one atomic exchange of the two folders (Linux ``renameat2`` with
``RENAME_EXCHANGE``), so a crash at any instant leaves the old folder or the new one at the target;
where the kernel lacks it, two renames (old -> backup, new -> target), and a crash between them
leaves the target absent and the backup beside it. A full disk is an ``OSError`` (ENOSPC) naming
the target, with the temporary folder removed and the previous folder untouched.

The temporary and backup folders are hidden siblings named for the target and the saving process
(``.<name>.saving-<pid>-<random>``, ``.<name>.old-<pid>-<random>``). A process killed mid-save leaves
one behind; the next save to that target (``sweep_stale``) removes those whose process is gone, and
where the kill came between the two renames (the target absent, a backup beside it) puts the backup
back first: the previous checkpoint again. "Gone" is judged on this host (a pid that no longer
runs); folders of a live process, or of another host on a shared volume, are left alone.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import torch

from . import safetensors_io
from .checkpoint_files import WeightNames
from .files import atomic_write_text, owner_gone


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
    sweep_stale(target)
    tmp = temp_sibling(target)
    try:
        if target.is_dir():
            _carry_over(target, tmp, names, config_name)
        write_config(tmp)
        write_weights(tmp, tensors, names, max_shard_size, safe, save_function)
        _fsync_dir(tmp)
        swap_in(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise disk_full(target) from exc
        raise
    return target


def temp_sibling(target: Path) -> Path:
    """A new hidden folder beside ``target`` for a save in progress, named for this process."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-{os.getpid()}-", dir=target.parent))


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporary and backup folders that killed saves left beside ``target``; where the
    target is missing and a dead save's backup is there, restore the backup first. Returns what it removed."""
    removed: list[Path] = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    stale = [p for p in siblings if p.is_dir() and not p.is_symlink() and owner_gone(p)
             and (p.name.startswith(f".{target.name}.saving-") or p.name.startswith(f".{target.name}.old-"))]
    backups = sorted((p for p in stale if p.name.startswith(f".{target.name}.old-")), key=lambda p: p.stat().st_mtime)
    if backups and not target.exists():
        try:
            os.rename(backups[-1], target)  # the killed save's previous checkpoint, back in place
            stale.remove(backups[-1])
        except OSError:
            pass
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


def disk_full(target: Path) -> OSError:
    return OSError(errno.ENOSPC, f"save_pretrained: no space left on the device holding {target.parent}; "
                                 f"nothing was saved to {target} (its previous contents, if any, are intact)")


def swap_in(tmp: Path, target: Path) -> None:
    """Make the finished folder ``tmp`` the ``target``: one atomic exchange where the kernel has it."""
    if not target.is_dir():
        os.rename(tmp, target)
        return
    cwd = _cwd_inside(target)
    if _exchange(tmp, target):
        old = tmp  # the exchange left the previous folder under the temporary name
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
    if cwd is not None:  # the process sat in the old folder: follow it to the new one
        os.chdir(cwd if cwd.is_dir() else target)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


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
