"""Build and load our C kernels for x86-64 CPUs with AVX512-BF16 (attention_cpu.c, geglu_cpu.c,
group_norm_cpu.c, linear_geglu_cpu.c, winograd_cpu.c; shared helpers in the .h files), and the fp32 ones
(attention_f32_cpu.c, linear_geglu_f32_cpu.c, winograd_f32_cpu.c) for any CPU with AVX-512.

A source is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into
the cache directory (``$XDG_CACHE_HOME/diffusion-runtime/kernels``, a file name per source and
flags; written to a temporary file and renamed, so nothing half-written is ever loaded), then
loaded with ctypes. OpenMP comes from the libgomp torch's CPU build already loaded, so the
kernels share torch's thread pool. ``load(source)`` returns the library or why it cannot run here.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import cpu_features

FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
         "-shared", "-fPIC")
# Kernels that compute in fp32 only need AVX-512 (F, BW, VL): built without the bf16 extension, they
# also run on CPUs without it (Intel Skylake-SP and Cascade Lake servers, AMD Zen 3 has no AVX-512 at all).
FP32_FLAGS = tuple(f for f in FLAGS if f != "-mavx512bf16")

_lock = threading.Lock()
_loaded: dict[str, tuple[ctypes.CDLL | None, str | None]] = {}
_bound: list[dict] = []  # every state ``bind`` filled, so ``forget`` can empty them
_loaded_ever: dict[str, bool] = {}  # source stem -> needs AVX512-BF16, for every library loaded (kept by forget)


def kernel_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "diffusion-runtime" / "kernels"


_fallback_dir: list[Path] = []


def _writable_dir(preferred: Path) -> Path:
    """``preferred`` if a library can be written there, else (with one warning) a private temporary
    folder for this process: a read-only or unusable cache costs a rebuild per process, not a crash."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(suffix=".probe", dir=preferred)
        os.close(fd)
        os.unlink(probe)
        return preferred
    except OSError as e:
        if not _fallback_dir:
            _fallback_dir.append(Path(tempfile.mkdtemp(prefix="diffusion-runtime-kernels-")))
            warnings.warn(f"kernel cache {preferred} is not writable ({e}); building our CPU kernels in "
                          f"{_fallback_dir[0]} for this process only (set XDG_CACHE_HOME to a writable folder "
                          "to keep them)", RuntimeWarning, stacklevel=3)
        return _fallback_dir[0]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str, source: Path, target: Path, flags: tuple[str, ...]) -> str | None:
    """Compile ``source`` into ``target``; None, or why it failed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as e:
        return f"building {source.name}: cannot write to {target.parent}: {e}"
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"building {source.name} with {compiler} failed (exit {done.returncode}): {tail}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"building {source.name} with {compiler} failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def machine_reason(bf16: bool = True) -> str | None:
    """None when this machine can run the kernels (``bf16``: those that need AVX512-BF16, else those
    that need AVX-512 only), else why not. Reads cpu_features.current(), which tests can fake."""
    cpu = cpu_features.current()
    if not cpu.x86_64:
        return f"our CPU kernels are for x86-64; this machine is {platform.machine()}"
    have, what = (cpu.avx512_bf16, "AVX512-BF16") if bf16 else (cpu.avx512, "AVX-512")
    if not have:
        return f"this CPU has no {what}"
    return None


def _load(source: Path, bf16: bool) -> tuple[ctypes.CDLL | None, str | None]:
    why = machine_reason(bf16)
    if why:
        return None, why
    flags = FLAGS if bf16 else FP32_FLAGS
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    parts = [source.read_bytes()] + [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # cpu_math.h
    key = hashlib.sha256(b"".join(parts) + " ".join((compiler,) + flags).encode()).hexdigest()[:16]
    path = kernel_cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():  # a read-only cache that already holds the library is used as it is
        path = _writable_dir(path.parent) / path.name
    if not path.exists():
        why = _build(compiler, source, path, flags)
        if why:
            return None, why
    try:
        lib = ctypes.CDLL(str(path))
        _loaded_ever[source.stem] = bf16
        return lib, None
    except OSError as e:
        return None, f"loading {path} failed: {e}"


def load(source: Path, bf16: bool = True) -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library of ``source`` (built on first call; ``bf16=False`` for an fp32-only kernel,
    built and run without AVX512-BF16), or None and why not. Cached."""
    name = str(source)
    if name not in _loaded:
        with _lock:
            if name not in _loaded:
                _loaded[name] = _load(source, bf16)
    return _loaded[name]


def bind(state: dict, source: Path, symbols, bf16: bool = True) -> str | None:
    """Fill ``state`` once with the entry points of ``source``'s library named by ``symbols()``
    (name -> (restype, argtypes)), or with ``"why"``; returns why they are unavailable. After the
    first call it only reads ``state`` (it runs once per kernel call)."""
    if not state:
        if not any(state is known for known in _bound):
            _bound.append(state)
        lib, why = load(source, bf16)
        if lib is None:
            state["why"] = why
        else:
            for name, (restype, argtypes) in symbols().items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
                state[name] = fn
    return state.get("why")


def forget() -> None:
    """Drop what ``load`` and ``bind`` cached (tests change the machine's answers and ask again)."""
    with _lock:
        _loaded.clear()
        for state in _bound:
            state.clear()


def loaded_on_host() -> list[str]:
    """The kernels (source stems) loaded in this process that the host itself can run: under faked
    flags (cpu_features.assumed) a library may be loaded for a decision on a CPU the host is not."""
    host = cpu_features.host()
    return sorted(stem for stem, bf16 in _loaded_ever.items()
                  if host.x86_64 and (host.avx512_bf16 if bf16 else host.avx512))


def profiled(name: str):
    """A profiler range ``name`` around a kernel call while torch's profiler records (bench/profile_step.py
    reads them), else nothing: entering a range has a cost of its own (measured: bench/RESULTS.md,
    'Figures moved from docstrings'), paid a hundred times per UNet call."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()
