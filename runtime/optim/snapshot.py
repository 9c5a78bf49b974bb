"""Keep a module's tensors so a pass that converts them (dtype, memory format) reverts exactly.

``module.to(...)`` swaps each parameter's ``.data`` and reassigns each buffer; the snapshot keeps the
old tensors and ``restore()`` puts them back, bit for bit, with the same Parameter objects (so
references held elsewhere stay valid).

Holding an original costs its memory once the module no longer uses it (precision's fp32 weights
beside the bf16 ones it made: 467 MiB on the bench's small model). So ``release()``, called once the
conversion is done (``UndoLog.tensors(module, convert)``), decides for each original the module no
longer holds where it waits for ``restore()``. The policy, in this one place:

1. **Left to its file.** A CPU tensor that lies in a private memory map of a regular file (safetensors
   checkpoints load that way, runtime/models/safetensors_io.py) keeps its storage, and its whole
   pages that are still the file's own (``/proc/self/pagemap``: none written since it was mapped) go
   back to the kernel (``madvise(MADV_DONTNEED)``). Read again they come back from the file, the same
   bytes at the same address, so ``restore`` puts back the very tensor; a page written since (an edit
   after load, through the parameter or through ``.data``) is a private copy and stays in memory, so
   edits come back as edited. The snapshot keeps the file open and, before restoring anything, checks
   that its size and modification time are what they were: a file rewritten in place since is a
   ``SnapshotError`` (nothing restored), never silently other weights. A file replaced by a rename,
   or deleted, since the release does not matter (the map and the open file hold the old one); one
   whose path no longer names the mapped file at release time (another device or inode), an unlinked
   one or a shared map goes to 2. Linux only (elsewhere: 2).
2. **Spilled.** Any other dense CPU tensor of at least ``SPILL_MIN_BYTES`` is written to a nameless
   temporary file in the spill folder (``$DIFFUSION_RUNTIME_SPILL_DIR``; default
   ``$XDG_CACHE_HOME/diffusion-runtime/spill``, ``~/.cache/...`` without it; ``off`` never spills);
   ``restore`` reads it back into new memory (same dtype, shape, strides and bytes; a new storage).
   The file is unlinked as it is made (``tempfile.TemporaryFile``), so it goes with the restore,
   with the snapshot, or with the process however it ends. A folder that cannot be written, a full
   disk or a failed write keeps the tensors in memory with a ``RuntimeWarning``; a folder on tmpfs or
   ramfs keeps them in memory quietly (a file there is memory too).
3. **Kept in memory**: the rest (small tensors, device tensors, non-dense or opaque ones).

The module's converted tensors (dense CPU ones of at least ``SPILL_MIN_BYTES``; Linux) go the same
way as a loaded checkpoint's: written to a nameless file in the spill folder, each from a page of its
own, and mapped privately (``_on_file_pages``), so they are in memory only once read. A pass whose
derived copy serves a weight's calls (prepack's packed weight, Winograd's transformed one) says so
(``derived.served``), and ``give_back`` hands that weight's pages back, those written since excepted;
a fallback that reads the weight again (another dtype, autograd, tracing) reads them from the file.
So a weight and its derived copy are not both in memory. Reading a neighbour maps some pages of a
weight already given back again (the kernel's fault-around: up to 64 KiB of cached pages around a
fault). The disk holds the converted tensors and the spilled originals until revert (or exit).

Snapshots not yet restored are listed by ``live_snapshots()``: code that edits weights in place for
good (``fuse_lora``, runtime/lora/fuse.py) edits the tensors a revert would put back too, through
``held()``, so the edit survives the revert (a spilled original is read back into memory for that).

``where()`` says how many bytes of the originals are in each place, ``on_file_pages`` how many of the
converted tensors moved (the tests count them; bench/bench_memory.py reports them). A caller that
converts without ``release()`` keeps every original in memory and the converted tensors where the
conversion made them, as before.
"""
from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
import stat
import sys
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

SPILL_ENV = "DIFFUSION_RUNTIME_SPILL_DIR"
SPILL_MIN_BYTES = 64 * 1024  # smaller originals stay in memory: a file write each costs more than they hold
PAGE = mmap.PAGESIZE
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


class SnapshotError(RuntimeError):
    """``restore()`` could not give back the original tensors (nothing was restored)."""


def spill_dir() -> str | None:
    """Where originals are spilled (see the module docstring); None: spilling is off."""
    value = os.environ.get(SPILL_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return value
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "diffusion-runtime", "spill")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _flat_bytes(t: torch.Tensor) -> torch.Tensor | None:
    """The bytes of ``t``'s elements in memory order (a uint8 view), or None unless ``t`` is a dense,
    non-overlapping CPU tensor of an ordinary dtype (contiguous or channels_last)."""
    if (t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized or t.numel() == 0
            or t.dtype.is_complex or t.element_size() == 0):
        return None
    dense = t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    if not dense:
        return None
    try:
        flat = torch.as_strided(t.detach(), (t.numel(),), (1,), t.storage_offset())
        return flat.view(torch.uint8)
    except (RuntimeError, TypeError):
        return None


# ---- 1. originals left to their file -------------------------------------------------------------
class _Maps:
    """This process's memory maps (``/proc/self/maps``), looked up by address; empty off Linux."""

    def __init__(self):
        self.rows: list[tuple[int, int, str, int, int, int, int, str]] = []
        if not sys.platform.startswith("linux"):
            return
        try:
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue  # anonymous memory
            try:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                self.rows.append((start, end, parts[1], int(parts[2], 16), major, minor, int(parts[4]), parts[5]))
            except ValueError:
                continue
        self.rows.sort()
        self.starts = [r[0] for r in self.rows]

    def find(self, start: int, end: int):
        """The map holding the whole range ``[start, end)``, or None."""
        if not self.rows:
            return None
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0:
            return None
        row = self.rows[i]
        return row if row[0] <= start and end <= row[1] else None


def _clean_runs(pagemap: int, start: int, end: int) -> list[tuple[int, int]]:
    """The runs of pages in ``[start, end)`` (page-aligned, in a private file map) that are the file's
    own: in memory as file pages, or not in memory and not swapped out (read from the file when
    touched). A page written since it was mapped is a private copy (anonymous): never in a run."""
    first, count = start // PAGE, (end - start) // PAGE
    data = bytearray()
    while len(data) < 8 * count:
        chunk = os.pread(pagemap, 8 * count - len(data), 8 * first + len(data))
        if not chunk:
            return []
        data += chunk
    flags = (torch.frombuffer(data, dtype=torch.int64) >> 61) & 7  # bit 61 file page, 62 swapped, 63 present
    written = (((flags & 4) != 0) & ((flags & 1) == 0)) | ((flags & 2) != 0)
    if not bool(written.any()):
        return [(start, end)]
    clean = (~written).to(torch.int8)
    edges = torch.diff(clean, prepend=clean.new_zeros(1), append=clean.new_zeros(1))
    firsts = (edges == 1).nonzero().flatten().tolist()
    lasts = (edges == -1).nonzero().flatten().tolist()
    return [(start + a * PAGE, start + b * PAGE) for a, b in zip(firsts, lasts)]


def _dontneed(runs: list[tuple[int, int]]) -> int:
    """Hand the pages of ``runs`` back to the kernel; the bytes given back."""
    return sum(e - s for s, e in runs if _madvise_dontneed(s, e - s))


@dataclass
class _MappedFile:
    """A file some originals were left to: kept open, with what its size and mtime were."""

    file: object
    path: str
    size: int
    mtime_ns: int

    def changed(self) -> str | None:
        try:
            st = os.fstat(self.file.fileno())
        except (OSError, ValueError) as err:
            return f"cannot stat it ({err})"
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return (f"it was rewritten in place since (size {self.size} -> {st.st_size} bytes, "
                    f"mtime {self.mtime_ns} -> {st.st_mtime_ns})")
        return None


class _FileBacking:
    """Finds which originals can be left to their file (policy 1) and hands their pages back."""

    def __init__(self):
        self.maps = _Maps()
        self.files: dict[tuple[int, int, int], _MappedFile | None] = {}
        self.pagemap = None
        if self.maps.rows:
            try:
                self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
            except OSError:
                self.pagemap = None

    def close(self) -> None:
        if self.pagemap is not None:
            os.close(self.pagemap)
            self.pagemap = None

    def _file(self, row) -> _MappedFile | None:
        _, _, _, _, major, minor, inode, path = row
        key = (major, minor, inode)
        if key not in self.files:
            self.files[key] = None
            if path.startswith("/") and not path.endswith(" (deleted)"):
                try:
                    f = open(path, "rb")
                except OSError:
                    f = None
                if f is not None:
                    st = os.fstat(f.fileno())
                    if (stat.S_ISREG(st.st_mode) and st.st_ino == inode
                            and (os.major(st.st_dev), os.minor(st.st_dev)) == (major, minor)):
                        self.files[key] = _MappedFile(f, path, st.st_size, st.st_mtime_ns)
                    else:  # the path now names another file than the one mapped
                        f.close()
        return self.files[key]

    def pages(self, t: torch.Tensor):
        """``(file, runs)``: the runs of whole pages of ``t`` still its file's own, or None when ``t``
        does not lie in a private map of a file whose path still names it (or has no whole page)."""
        if self.pagemap is None:
            return None
        flat = _flat_bytes(t)
        if flat is None:
            return None
        lo = flat.data_ptr()
        hi = lo + flat.numel()
        start, end = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
        if end <= start:
            return None  # no whole page: nothing to give back
        if _in_our_maps(lo, hi) is not None:  # converted earlier onto file pages: a nameless file nobody writes
            try:
                runs = _clean_runs(self.pagemap, start, end)
            except OSError:
                return None
            return (None, runs) if runs else None
        row = self.maps.find(lo, hi)
        if row is None or "p" not in row[2]:
            return None  # not a private file map (anonymous memory, or a shared map)
        mapped = self._file(row)
        if mapped is None or row[3] + (hi - row[0]) > mapped.size:
            return None
        try:
            runs = _clean_runs(self.pagemap, start, end)
        except OSError:
            return None
        return (mapped, runs) if runs else None


def file_backing_ready() -> str | None:
    """None when originals can be left to their files here (policy 1), else why not."""
    backing = _FileBacking()
    try:
        if not backing.maps.rows:
            return "no /proc/self/maps (not Linux?)"
        if backing.pagemap is None:
            return "cannot read /proc/self/pagemap"
        return None
    finally:
        backing.close()


_libc = None


def _madvise_dontneed(start: int, length: int) -> bool:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _libc = False
    if not _libc or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    return _libc.madvise(start, length, mmap.MADV_DONTNEED) == 0


# ---- 2. spilled originals ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spilled:
    """Where one original's bytes are in the spill file, and what tensor they make."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    size: tuple
    stride: tuple

    def read(self, f) -> torch.Tensor:
        raw = torch.empty(self.nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        f.seek(self.offset)
        done = 0
        while done < self.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise SnapshotError(f"spill file ended after {self.offset + done} bytes "
                                    f"(expected {self.offset + self.nbytes})")
            done += n
        return raw.view(self.dtype).as_strided(self.size, self.stride)


def _write_all(f, data: memoryview) -> None:
    while len(data):
        n = f.write(data)
        if not n:
            raise OSError("short write to the spill file")
        data = data[n:]


def _memory_filesystem(folder: str) -> str | None:
    """The file system type of ``folder`` when it is a memory one (tmpfs, ramfs), else None."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(folder)
    best, kind = "", None
    for point, fstype in mounts:
        point = point.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fstype
    return kind if kind in MEMORY_FILESYSTEMS else None


def _spill_file(label: str, what: str, total: int):
    """A nameless file in the spill folder, or None: spilling off, a memory file system (said in the
    log), or the folder unusable (a ``RuntimeWarning``)."""
    folder = spill_dir()
    if folder is None:
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        kind = _memory_filesystem(folder)
        if kind is not None:
            logger.info("%s: %s is on %s; %.1f MiB of %s stay in memory", label, folder, kind, total / 2**20, what)
            return None
        return tempfile.TemporaryFile(dir=folder, prefix="spill-", buffering=0)
    except OSError as err:
        _cannot_spill(label, what, total, folder, err)
        return None


def _cannot_spill(label: str, what: str, total: int, folder: str, err: BaseException) -> None:
    warnings.warn(f"{label}: could not spill {total / 2**20:.1f} MiB of {what} to {folder} ({err}); they stay in "
                  f"memory (set {SPILL_ENV} to a writable folder on disk)", RuntimeWarning, stacklevel=5)


def _spill(tensors: list[torch.Tensor], label: str):
    """Write ``tensors`` to one nameless file; ``(file, [_Spilled])``, or None (they stay in memory)."""
    what, total = "original tensors", sum(_nbytes(t) for t in tensors)
    f = _spill_file(label, what, total)
    if f is None:
        return None
    try:
        records, offset = [], 0
        for t in tensors:
            flat = _flat_bytes(t)
            _write_all(f, memoryview(flat.numpy()))
            records.append(_Spilled(offset, flat.numel(), t.dtype, tuple(t.shape), tuple(t.stride())))
            offset += flat.numel()
        return f, records
    except OSError as err:  # full disk, I/O error
        f.close()
        _cannot_spill(label, what, total, spill_dir(), err)
        return None


# ---- converted tensors on file pages ---------------------------------------------------------------
_maps_lock = threading.Lock()
_our_maps: list[tuple[int, int, weakref.ref]] = []  # (start, end, the mmap) of the maps _on_file_pages made


def _on_file_pages(tensors: list[torch.Tensor], label: str) -> list[torch.Tensor] | None:
    """Copies of ``tensors`` (dense CPU ones) in a private map of one nameless spill file, each from a
    page of its own and not yet in memory; None when the spill folder cannot take them."""
    what, total = "converted tensors", sum(_nbytes(t) for t in tensors)
    f = _spill_file(label, what, total)
    if f is None:
        return None
    try:
        offsets, offset = [], 0
        for t in tensors:
            flat = _flat_bytes(t)
            _write_all(f, memoryview(flat.numpy()))
            offsets.append(offset)
            offset += flat.numel()
            pad = -offset % PAGE
            if pad:
                _write_all(f, memoryview(bytes(pad)))
                offset += pad
        mm = mmap.mmap(f.fileno(), offset, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as err:  # full disk, I/O error, no map
        _cannot_spill(label, what, total, spill_dir(), err)
        return None
    finally:
        f.close()  # the map keeps the file; it goes with the last tensor made from it
    copies = []
    for t, at in zip(tensors, offsets):
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=_nbytes(t), offset=at)
        copies.append(raw.view(t.dtype).as_strided(tuple(t.shape), tuple(t.stride())))
    register_map(mm, torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr(), offset)
    del mm  # the copies keep it
    return copies


def register_map(mm: mmap.mmap, base: int, length: int) -> None:
    """Count a private map of a file nobody writes in place (``_on_file_pages``' nameless files, the copies of
    runtime/optim/derived_store.py) among the maps ``give_back`` hands clean pages back from."""
    with _maps_lock:
        _our_maps[:] = [m for m in _our_maps if m[2]() is not None]
        _our_maps.append((base, base + length, weakref.ref(mm)))


def to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype=dtype)``, but each floating CPU tensor the derived-weight store holds a conversion of
    (runtime/optim/derived_store.py: the same source bytes, dtype, shape and strides) takes the stored copy
    instead of being converted: a warm process converts nothing. Same Parameters, same buffers' names."""
    from . import derived_store

    if derived_store.store_dir() is None:
        module.to(dtype=dtype)
        return
    maps = _Maps()
    size = torch.empty((), dtype=dtype).element_size()

    def converted(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.dtype == dtype:
            return t
        if t.device.type == "cpu" and t.numel() * size >= derived_store.MIN_BYTES:  # the store keeps no smaller
            key = derived_store.conversion_key(t.detach(), dtype, t.shape, t.stride(), maps)
            found = derived_store.lookup(key)
            if found is not None:
                return found
            if key is not None:
                derived_store.stats["made"] += 1
        return t.detach().to(dtype)

    with torch.no_grad():
        for p in module.parameters():
            p.data = converted(p.data)
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[name] = converted(buf)


def _from_store(targets, originals: dict) -> list:
    """Each converted tensor from the derived-weight store (runtime/optim/derived_store.py): the copy an
    earlier process stored for the same original bytes and conversion, else this one stored and mapped
    back; None where its original has no origin or the store cannot take it (``_on_file_pages`` then)."""
    from . import derived_store

    if derived_store.store_dir() is None:
        return [None] * len(targets)
    maps = _Maps()
    out = []
    for kind, i, current in targets:
        lo = current.data_ptr()
        if _in_our_maps(lo, lo + _nbytes(current)) is not None:  # taken from the store by to_dtype already
            out.append(current)
            continue
        key = derived_store.conversion_key(originals[(kind, i)], current.dtype, current.shape, current.stride(), maps)
        found = derived_store.lookup(key)
        if found is None and key is not None:
            found = derived_store.store(key, current)
        out.append(found)
    return out


def _in_our_maps(lo: int, hi: int) -> tuple[int, int] | None:
    """The live map ``_on_file_pages`` made that holds ``[lo, hi)``, or None."""
    with _maps_lock:
        for s, e, ref in _our_maps:
            if s <= lo and hi <= e and ref() is not None:
                return s, e
    return None


def give_back(t: torch.Tensor) -> int:
    """Hand the pages of ``t`` back to the kernel where it lies in a map ``_on_file_pages`` made and they
    are still the file's (never one written since): read again, they come back from the file, the same
    bytes. For a weight whose calls a derived copy serves (runtime/optim/derived.py, ``served``).
    Returns the bytes given back (0 for any other tensor)."""
    if t.device.type != "cpu" or t.layout != torch.strided or t.numel() == 0:
        return 0
    lo = t.data_ptr()
    hi = lo + _nbytes(t)
    found = _in_our_maps(lo, hi)
    if found is None or not sys.platform.startswith("linux"):
        return 0
    s, e = found
    start, end = max(s, lo // PAGE * PAGE), min(e, -(-hi // PAGE) * PAGE)  # each tensor's pages are its own
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return 0
    try:
        runs = _clean_runs(pagemap, start, end)
    except OSError:
        return 0
    finally:
        os.close(pagemap)
    return _dontneed(runs)


# ---- the snapshot --------------------------------------------------------------------------------
_live: "weakref.WeakSet[TensorSnapshot]" = weakref.WeakSet()


def live_snapshots() -> list["TensorSnapshot"]:
    """Snapshots taken and not restored yet (held by some undo log)."""
    return list(_live)


@dataclass(eq=False)  # compared by identity: snapshots live in a WeakSet
class TensorSnapshot:
    params: list[tuple[torch.nn.Parameter, torch.Tensor | _Spilled]] = field(default_factory=list)
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor | _Spilled]] = field(default_factory=list)
    mapped: list[_MappedFile] = field(default_factory=list)  # the files originals were left to, kept open
    left: dict = field(default_factory=dict)  # ("param" | "buffer", index) -> bytes of it given back to its file
    spill_file: object = None
    on_file_pages: int = 0  # bytes of the module's converted tensors moved to file pages

    @classmethod
    def take(cls, module: torch.nn.Module) -> "TensorSnapshot":
        snap = cls()
        for p in module.parameters():
            snap.params.append((p, p.data))
        for sub in module.modules():
            for name, buf in sub._buffers.items():
                if buf is not None:
                    snap.buffers.append((sub, name, buf))
        _live.add(snap)
        return snap

    def held(self, ids=None) -> dict[int, torch.Tensor]:
        """``id(parameter) -> tensor`` this snapshot puts back on restore, for the parameters whose ids are
        in ``ids`` (None: all); their spilled originals are read back into memory first (the caller may
        edit them in place: ``fuse_lora``), the others' stay where they are."""
        out = {}
        for i, (p, data) in enumerate(self.params):
            if ids is not None and id(p) not in ids:
                continue
            if isinstance(data, _Spilled):
                try:
                    data = data.read(self.spill_file)
                except OSError as err:
                    raise SnapshotError(f"could not read a spilled original tensor back ({err})") from err
                self.params[i] = (p, data)
            out[id(p)] = data
        return out

    def _released(self) -> list[tuple[str, int, torch.Tensor]]:
        """``(kind, index, original)`` of the originals the module no longer holds."""
        out = []
        for i, (p, data) in enumerate(self.params):
            if isinstance(data, torch.Tensor) and not _same_storage(p.data, data):
                out.append(("param", i, data))
        for i, (sub, name, buf) in enumerate(self.buffers):
            current = sub._buffers.get(name)
            if isinstance(buf, torch.Tensor) and (current is None or not _same_storage(current, buf)):
                out.append(("buffer", i, buf))
        return out

    def release(self, label: str = "snapshot") -> None:
        """After the conversion: move the originals the module no longer holds out of memory, and the
        module's converted tensors onto file pages (the module docstring's policy)."""
        released = self._released()
        if not released:
            return
        backing = _FileBacking()
        try:
            to_file, to_spill = [], []
            for kind, i, t in released:
                pages = backing.pages(t)
                if pages is not None:
                    to_file.append(((kind, i), *pages))
                elif _nbytes(t) >= SPILL_MIN_BYTES and _flat_bytes(t) is not None:
                    to_spill.append((kind, i, t))
        finally:
            backing.close()
        if to_spill:
            done = _spill([t for _, _, t in to_spill], label)
            if done is not None:
                self.spill_file, records = done
                for (kind, i, _), record in zip(to_spill, records):
                    items = self.params if kind == "param" else self.buffers
                    items[i] = (*items[i][:-1], record)
        files = {id(m): m for m in self.mapped}
        for key, mapped, runs in to_file:
            given = _dontneed(runs)
            if given:
                self.left[key] = self.left.get(key, 0) + given
                if mapped is not None:
                    files[id(mapped)] = mapped
        self.mapped = list(files.values())
        for mapped in backing.files.values():  # opened to check, but no original was left to it
            if mapped is not None and id(mapped) not in files:
                mapped.file.close()
        self._converted_on_file_pages(released, label)

    def _converted_on_file_pages(self, released, label: str) -> None:
        """The module's tensors that replaced ``released`` originals, moved to file pages (policy 4)."""
        targets = []
        for kind, i, _ in released:
            if kind == "param":
                p = self.params[i][0]
                current = p.data
            else:
                sub, name, _ = self.buffers[i]
                current = sub._buffers.get(name)
            if (current is not None and _nbytes(current) >= SPILL_MIN_BYTES and _flat_bytes(current) is not None
                    and not current.requires_grad):
                targets.append((kind, i, current))
        if not targets or not sys.platform.startswith("linux"):
            return
        placed = _from_store(targets, {(k, i): t for k, i, t in released})
        rest = [target for target, copy in zip(targets, placed) if copy is None]
        copies = _on_file_pages([t for _, _, t in rest], label) if rest else []
        if copies is None:
            copies = [None] * len(rest)
        made = iter(copies)
        placed = [copy if copy is not None else next(made) for copy in placed]
        for (kind, i, _), copy in zip(targets, placed):
            if copy is None:
                continue
            if kind == "param":
                self.params[i][0].data = copy
            else:
                sub, name, _ = self.buffers[i]
                sub._buffers[name] = copy
            self.on_file_pages += _nbytes(copy)

    def where(self) -> dict[str, int]:
        """Bytes of the originals by where they are: ``module`` (still the module's own tensors),
        ``memory`` (held only by the snapshot, in memory), ``file`` (given back to their checkpoint
        file), ``spill`` (in the spill file)."""
        out = {"module": 0, "memory": 0, "file": 0, "spill": 0}
        released = {(k, i) for k, i, _ in self._released()}
        for kind, items in (("param", self.params), ("buffer", self.buffers)):
            for i, item in enumerate(items):
                t = item[-1]
                if isinstance(t, _Spilled):
                    out["spill"] += t.nbytes
                elif (kind, i) in released:
                    given = self.left.get((kind, i), 0)
                    out["file"] += given
                    out["memory"] += _nbytes(t) - given
                else:
                    out["module"] += _nbytes(t)
        return out

    def restore(self) -> None:
        """Put every original back; checks first, so a failure restores nothing (``SnapshotError``)."""
        for mapped in self.mapped:
            why = mapped.changed()
            if why is not None:
                raise SnapshotError(f"the original weights were left to {mapped.path}, but {why}; they cannot be "
                                    f"restored from it (reload the model)")
        read = {}
        if self.spill_file is not None:
            try:
                for kind, items in (("param", self.params), ("buffer", self.buffers)):
                    for i, item in enumerate(items):
                        if isinstance(item[-1], _Spilled):
                            read[(kind, i)] = item[-1].read(self.spill_file)
            except OSError as err:
                raise SnapshotError(f"could not read the spilled original tensors back ({err})") from err
        for i, (p, data) in enumerate(self.params):
            p.data = read.get(("param", i), data)
        for i, (sub, name, buf) in enumerate(self.buffers):
            sub._buffers[name] = read.get(("buffer", i), buf)
        self.params = [(p, p.data) for p, _ in self.params]
        self.buffers = [(sub, name, sub._buffers[name]) for sub, name, _ in self.buffers]
        self.close()
        _live.discard(self)

    def close(self) -> None:
        """Close the spill file and the files kept open (``restore`` does it)."""
        if self.spill_file is not None:
            self.spill_file.close()
            self.spill_file = None
        for mapped in self.mapped:
            mapped.file.close()
        self.mapped, self.left, self.on_file_pages = [], {}, 0


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    try:
        return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
