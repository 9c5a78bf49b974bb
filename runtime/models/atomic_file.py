"""Write one file atomically: a hidden temporary sibling, then a rename over the target.

A crash at any point leaves the target as it was (or absent, if it was) or complete, never half
written. The temporary file is named for the target and the writing process
(``.<name>.saving-<pid>-<random>.tmp``, readable as the umask allows, not mkstemp's 0600); one a
killed process left behind is removed by the next write of that target, once its process is gone on
this host (runtime/models/checkpoint_save.py's rule for folders). Used by ``save_lora_weights`` and
``save_single_file``.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .checkpoint_save import _owner_gone


def sweep_stale_files(path: Path) -> list[Path]:
    """Remove the temporary files that killed writes of ``path`` left beside it; returns them."""
    prefix, removed = f".{path.name}.saving-", []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file() and not p.is_symlink():
            if _owner_gone(p.with_name(p.name[: -len(".tmp")])):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
