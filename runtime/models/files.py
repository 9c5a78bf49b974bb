"""Atomic file writes: write to a hidden temporary sibling, then rename it over the target.

A crash at any point leaves the target as it was (or absent, if it was) or complete, never half
written. The temporary file is named for the target and the writing process
(``.<name>.saving-<pid>-<random>.tmp``, readable as the umask allows, not mkstemp's 0600); one a
killed process left behind is removed by the next write of that target once its process is gone on
this host (the rule checkpoint_save.py applies to folders). ``atomic_file`` serves writers that need
a path (safetensors: ``save_lora_weights``, ``save_single_file``), ``atomic_write_text`` / ``_bytes``
the JSON and text files.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def owner_gone(path: Path) -> bool:
    """Whether the pid in a ``.<name>.<kind>-<pid>-<random>`` name no longer runs on this host."""
    pid = path.name.rsplit("-", 2)[-2] if path.name.count("-") >= 2 else ""
    if not pid.isdigit():
        return False  # not one of ours (or an older name without a pid): leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def sweep_stale_files(path: Path) -> list[Path]:
    """Remove the temporary files that killed writes of ``path`` left beside it; returns them."""
    prefix, removed = f".{path.name}.saving-", []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file() and not p.is_symlink():
            if owner_gone(p.with_name(p.name[: -len(".tmp")])):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (setting it races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike):
    """``with atomic_file(path) as tmp:`` write ``tmp``; on leaving, ``tmp`` replaces ``path`` (an error
    inside removes ``tmp`` and leaves ``path`` as it was)."""
    path = Path(path)
    sweep_stale_files(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.saving-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the whole new one, never half."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
