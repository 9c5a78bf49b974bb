"""The measured-dispatch cache: choices on disk, one JSON file per machine key (dispatch.py).

The key is what a measured choice holds for: the CPU's model name and the flags decisions see
(runtime/kernels/cpu_features.py, so ``$DIFFUSION_RUNTIME_CPU_FLAGS`` and the tests' fake CPUs are
machines of their own), torch's thread count, the torch version and a hash of our C kernels' sources.
Another key is another file: a torch upgrade or an edited kernel is measured again, and machines that
share a home folder never overwrite each other. Writes are atomic (a temporary file in the folder,
renamed); a folder that cannot be written warns once and keeps the choices for the process; a file
that cannot be read as one of ours is ignored with a warning and rewritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT = 1  # of the cache files; another value is another key


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "diffusion-runtime" / "dispatch"


_kernel_hash: list[str] = []


def kernel_sources_hash() -> str:
    """A hash of our C kernels' sources and headers (an edited kernel is measured again)."""
    if not _kernel_hash:
        folder = Path(__file__).resolve().parent.parent / "kernels"
        h = hashlib.sha256()
        for f in sorted(folder.glob("*.[ch]")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        _kernel_hash.append(h.hexdigest()[:16])
    return _kernel_hash[0]


def machine_key() -> dict[str, Any]:
    """What a measured choice holds for: this CPU (model name and the flags decisions see), torch's thread
    count, the torch version, our kernels' sources."""
    from runtime.kernels import cpu_features  # here: importing runtime.kernels fixes Triton's mode

    return {"format": FORMAT, "cpu": cpu_features.model_name(), "flags": cpu_features.current().describe(),
            "threads": torch.get_num_threads(), "torch": str(torch.__version__), "kernels": kernel_sources_hash()}


class DispatchCache:
    """Measured choices on disk, one JSON file per machine key in ``directory`` (None: memory only).

    Files are ``<hash of the machine key>.json`` holding the key itself and ``entries``: so machines
    sharing a home folder never overwrite each other, and a changed key starts a new file."""

    def __init__(self, directory: str | Path | None):
        self.directory = None if directory is None else Path(directory)
        self._entries: dict[str, dict[str, dict]] = {}  # machine file name -> entries (loaded once)
        self._warned_write = False
        self._lock = threading.Lock()

    @staticmethod
    def file_name(machine: dict) -> str:
        text = json.dumps(machine, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16] + ".json"

    def path(self, machine: dict) -> Path | None:
        return None if self.directory is None else self.directory / self.file_name(machine)

    def _read(self, machine: dict) -> dict[str, dict]:
        path = self.path(machine)
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["entries"]
            if data.get("machine") != machine or not isinstance(entries, dict) or not all(
                    isinstance(e, dict) and isinstance(e.get("choice"), str) and isinstance(e.get("times"), dict)
                    for e in entries.values()):
                raise ValueError("not a dispatch cache file of this machine")
            return entries
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"dispatch cache file {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                          "ignoring it (it is rewritten with what is measured now)", RuntimeWarning, stacklevel=4)
            return {}

    def _loaded(self, machine: dict) -> dict[str, dict]:
        name = self.file_name(machine)
        if name not in self._entries:
            self._entries[name] = self._read(machine)
        return self._entries[name]

    def get(self, machine: dict, key: str) -> dict | None:
        with self._lock:
            return self._loaded(machine).get(key)

    def put(self, machine: dict, key: str, record: dict) -> None:
        with self._lock:
            entries = self._loaded(machine)
            entries[key] = record
            path = self.path(machine)
            if path is None:
                return
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"machine": machine, "entries": entries}, f, indent=1, sort_keys=True)
                    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            except OSError as e:
                if not self._warned_write:
                    self._warned_write = True
                    warnings.warn(f"dispatch cache {path.parent} is not writable ({e}); measured choices are kept "
                                  "for this process only (set XDG_CACHE_HOME to a writable folder to keep them)",
                                  RuntimeWarning, stacklevel=4)


_default_caches: dict[Path, DispatchCache] = {}


def default_cache() -> DispatchCache:
    """The cache under ``$XDG_CACHE_HOME/diffusion-runtime/dispatch`` (one object per folder and process)."""
    directory = default_cache_dir()
    return _default_caches.setdefault(directory, DispatchCache(directory))
