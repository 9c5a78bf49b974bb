"""Derived weight copies kept on disk between processes, so a warm process does not make them again.

Passes make copies of a model's weights: precision's bf16 weights, Winograd's transformed kernels, the
fused GEGLU kernel's packed weight, the upsample fold's phase kernels (runtime/optim/derived.py has the
rule by which such a copy follows its source inside a process). Making them is most of what a warm
process pays between ``optimize`` and its second call on SD 1.5 (bench/RESULTS.md, 'Cold start: derived
weights kept on disk'). ``cached(source, what, make)`` makes a copy once per machine and maps it back in
later processes.

Precision converts through ``snapshot.to_dtype``, which takes a stored conversion in place of converting a
tensor at all; the snapshot then stores the conversions it did make.

**What names a source.** Only a source whose bytes are a file's bytes: a CPU tensor lying whole in a
private map of a regular file that still has a name, none of whose pages (the partial ones at its ends
included) was written since it was mapped (``/proc/self/pagemap``, as runtime/optim/snapshot.py reads
it). Checkpoints loaded from safetensors are such tensors, and so are the copies this store maps back,
so a copy of a copy (Winograd's transform of precision's bf16 weight) is found too. The key is the
file's device, inode, size and modification time, the tensor's offset, dtype, shape and strides, what
is made of it (``what`` and its parameters) and what makes it (the format, torch's version, the CPU flags
the kernels were built for and a hash of our kernels' sources and of the module that makes the copy).
A file rewritten in place has another modification time, a file replaced by a rename another inode:
either is another key. Any other source (a tensor in memory, one edited since load, one on the spill
folder's nameless files) is never looked up: ``make()`` runs and nothing is stored.

**The files.** ``$DIFFUSION_RUNTIME_DERIVED_DIR`` (default ``$XDG_CACHE_HOME/diffusion-runtime/derived``,
``~/.cache/...`` without it; ``off`` turns the store off), one ``<hash of the key>.bin`` per copy: a page
of header (a magic line, then JSON: the key, dtype, shape, strides, byte count), then the bytes. Written
to a temporary file in the folder and renamed, so a reader sees no file or a whole one, and a process
killed mid-write leaves only a ``.tmp`` that a later write removes once it is an hour old. A copy is mapped
back privately (``ACCESS_COPY``): in memory only once read, and handed back to the kernel like any weight
on file pages (``give_back``). A file whose header is not ours or whose size is wrong is ignored with a
``RuntimeWarning``, removed and made again; the bytes themselves are not checksummed (reading them all
would cost what the store saves). A folder that cannot be written, or a full disk, warns once and keeps
the copies in memory. The folder holds at most ``$DIFFUSION_RUNTIME_DERIVED_GIB`` GiB (default 16); a
write beyond it removes the least recently used files first (a hit touches its file).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import mmap
import os
import stat
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

STORE_ENV = "DIFFUSION_RUNTIME_DERIVED_DIR"
LIMIT_ENV = "DIFFUSION_RUNTIME_DERIVED_GIB"
DEFAULT_LIMIT_GIB = 16.0
FORMAT = 1
PAGE = mmap.PAGESIZE
HEADER = max(4096, PAGE)
MAGIC = b"diffusion-runtime derived weight\n"
MIN_BYTES = 64 * 1024  # smaller copies are cheaper to make again than a file each
STALE_TMP_S = 3600.0

_lock = threading.Lock()
_warned: set[str] = set()
stats = {"hits": 0, "stored": 0, "made": 0}  # this process's counts (the tests and benchmarks read them)


def store_dir() -> Path | None:
    """The store's folder, or None when it is off."""
    value = os.environ.get(STORE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "diffusion-runtime" / "derived"


def limit_bytes() -> int:
    value = os.environ.get(LIMIT_ENV, "").strip()
    try:
        gib = float(value) if value else DEFAULT_LIMIT_GIB
    except ValueError:
        _warn_once("limit", f"{LIMIT_ENV}={value!r} is not a number of GiB; using {DEFAULT_LIMIT_GIB}")
        gib = DEFAULT_LIMIT_GIB
    return int(gib * 2**30)


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"derived-weight store: {message}", RuntimeWarning, stacklevel=4)


# ---- what names a source ---------------------------------------------------------------------------
def _all_clean(lo: int, hi: int) -> bool:
    """Whether no page of ``[lo, hi)`` in a private file map was written since it was mapped."""
    from .snapshot import _clean_runs

    start, end = lo // PAGE * PAGE, -(-hi // PAGE) * PAGE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return False
    try:
        return _clean_runs(fd, start, end) == [(start, end)]
    except OSError:
        return False
    finally:
        os.close(fd)


def origin(t: torch.Tensor, maps=None) -> dict | None:
    """What names ``t``'s bytes across processes (the module docstring), or None. ``maps``: this
    process's maps read once for many calls (``snapshot._Maps()``), else read here."""
    from .snapshot import _flat_bytes, _Maps

    if not sys.platform.startswith("linux") or t.requires_grad and torch.is_grad_enabled():
        return None
    flat = _flat_bytes(t)
    if flat is None:
        return None
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel()
    row = (maps or _Maps()).find(lo, hi)
    if row is None or "p" not in row[2]:
        return None
    start, _, _, offset, major, minor, inode, path = row
    if not path.startswith("/") or path.endswith(" (deleted)"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if (not stat.S_ISREG(st.st_mode) or st.st_ino != inode or (os.major(st.st_dev), os.minor(st.st_dev)) != (major, minor)
            or offset + (hi - start) > st.st_size or not _all_clean(lo, hi)):
        return None
    return {"file": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns], "offset": offset + (lo - start),
            "dtype": str(t.dtype), "shape": list(t.shape), "stride": list(t.stride())}


_code_hashes: dict[str, str] = {}


def _code_hash(maker: Callable | str | None) -> str:
    """A hash of the source file of ``maker`` (a function, or a module's file path)."""
    if maker is None:
        return ""
    path = maker if isinstance(maker, str) else inspect.getsourcefile(maker)
    if path not in _code_hashes:
        try:
            _code_hashes[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        except (OSError, TypeError):
            _code_hashes[path] = "unknown"
    return _code_hashes[path]


def key_of(source: torch.Tensor, what: str, maker=None, maps=None, **params) -> dict | None:
    """The store key of ``what`` made from ``source`` (None: ``source`` has no origin)."""
    found = origin(source, maps)
    if found is None:
        return None
    from runtime.kernels import cpu_features

    from .dispatch_cache import kernel_sources_hash

    return {"format": FORMAT, "source": found, "what": what, "params": params, "torch": str(torch.__version__),
            "flags": cpu_features.current().describe(), "kernels": kernel_sources_hash(),
            "code": _code_hash(maker)}


def conversion_key(source: torch.Tensor, dtype: torch.dtype, shape, stride, maps=None) -> dict | None:
    """The key of ``source`` converted to ``dtype`` with ``shape`` and ``stride`` (what ``.to`` keeps): the one
    key precision's conversion is stored and found under (runtime/optim/snapshot.py)."""
    return key_of(source, "convert", None, maps, dtype=str(dtype), shape=list(shape), stride=list(stride))


# ---- the files -------------------------------------------------------------------------------------
def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


def _map_back(path: Path, header: dict) -> torch.Tensor:
    """The stored copy at ``path``, on file pages of a private map."""
    from .snapshot import register_map

    dtype = _dtype(header["dtype"])
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), HEADER + header["nbytes"], access=mmap.ACCESS_COPY)
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=header["nbytes"], offset=HEADER)
    register_map(mm, raw.data_ptr() - HEADER, HEADER + header["nbytes"])  # give_back hands its pages back
    return raw.view(dtype).as_strided(tuple(header["shape"]), tuple(header["stride"]))


def _read(path: Path, digest: str) -> torch.Tensor | None:
    """The copy stored at ``path``, or None (no file; a bad one is removed with a warning)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
            size = os.fstat(f.fileno()).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None  # not stored (a folder that cannot be made warns when written to)
    except OSError as err:
        _warn_once(f"read {path.parent}", f"cannot read {path} ({err}); the copy is made again")
        return None
    try:
        if not head.startswith(MAGIC):
            raise ValueError("no header of ours")
        header = json.loads(head[len(MAGIC):].rstrip(b"\0"))
        if header.get("digest") != digest:
            raise ValueError(f"it holds key {header.get('digest')!r}, not {digest!r}")
        if size != HEADER + header["nbytes"]:
            raise ValueError(f"{size} bytes, expected {HEADER + header['nbytes']}")
        t = _map_back(path, header)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as err:
        warnings.warn(f"derived-weight store: ignoring {path} ({err}); the copy is made again", RuntimeWarning,
                      stacklevel=4)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):  # least recently used goes first; the mtime stays (copies of it name it)
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
    return t


def _write(folder: Path, digest: str, copy: torch.Tensor) -> Path | None:
    """Store ``copy`` atomically; its path, or None (the reason warned once)."""
    from .snapshot import _flat_bytes, _write_all

    flat = _flat_bytes(copy)
    if flat is None:
        return None
    header = {"digest": digest, "dtype": str(copy.dtype), "shape": list(copy.shape), "stride": list(copy.stride()),
              "nbytes": flat.numel()}
    head = MAGIC + json.dumps(header).encode()
    if len(head) > HEADER:
        return None
    path = folder / f"{digest}.bin"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _make_room(folder, HEADER + flat.numel())
        fd, tmp = tempfile.mkstemp(prefix=f".{digest}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                _write_all(f, memoryview(head + bytes(HEADER - len(head))))
                _write_all(f, memoryview(flat.numpy()))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        _warn_once(f"write {folder}", f"cannot write to {folder} ({err}); derived weights stay in memory and "
                   f"are made again by each process (set {STORE_ENV} to a writable folder, or 'off')")
        return None
    return path


_sizes: dict[Path, int] = {}  # bytes in each folder, counted once per process, then kept up to date


def _make_room(folder: Path, incoming: int) -> None:
    """Remove the least recently used files until ``incoming`` more bytes fit the limit (and .tmp files an
    hour old: a writer killed mid-write). The folder is scanned once per process and again when full."""
    limit = limit_bytes()
    if folder in _sizes and _sizes[folder] + incoming <= limit:
        _sizes[folder] += incoming
        return
    now, files, total = time.time(), [], 0
    with os.scandir(folder) as it:
        for e in it:
            try:
                st = e.stat()
            except OSError:
                continue
            if e.name.endswith(".tmp"):
                if now - st.st_mtime > STALE_TMP_S:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                continue
            if e.name.endswith(".bin"):
                files.append((st.st_atime, st.st_size, e.path))
                total += st.st_size
    for _, size, path in sorted(files):
        if total + incoming <= limit:
            break
        with contextlib.suppress(OSError):
            os.unlink(path)  # a process that mapped it keeps its pages (the map holds the inode)
            total -= size
    _sizes[folder] = total + incoming


# ---- the entry points ------------------------------------------------------------------------------
def lookup(key: dict | None) -> torch.Tensor | None:
    """The copy stored under ``key``, mapped back, or None (no key, store off, not stored, a bad file)."""
    folder = store_dir()
    if key is None or folder is None:
        return None
    digest = _digest(key)
    with _lock:
        found = _read(folder / f"{digest}.bin", digest)
    if found is not None:
        stats["hits"] += 1
    return found


def store(key: dict | None, copy: torch.Tensor) -> torch.Tensor | None:
    """Store ``copy`` under ``key`` and give it back mapped from its file; None where it was not stored
    (no key, the store off, a small or non-dense copy, a folder that cannot take it)."""
    folder = store_dir()
    if key is None or folder is None or copy.numel() * copy.element_size() < MIN_BYTES:
        return None
    digest = _digest(key)
    with _lock:
        written = _write(folder, digest, copy)
        mapped = None if written is None else _read(written, digest)
    if mapped is not None:
        stats["stored"] += 1
    return mapped


def cached(source: torch.Tensor, what: str, make: Callable[[], torch.Tensor], maker=None, **params) -> torch.Tensor:
    """``make()``, a copy derived from ``source``, or the one an earlier process stored for the same source
    bytes, ``what``, ``params`` and code (``maker``: the function or module file whose code makes it).
    A copy made here is stored and mapped back when ``source`` has an origin (the module docstring)."""
    key = None if store_dir() is None else key_of(source, what, maker, **params)
    found = lookup(key)
    if found is not None:
        return found
    copy = make()
    stats["made"] += 1
    mapped = store(key, copy)
    return copy if mapped is None else mapped
