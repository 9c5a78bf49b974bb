"""Build and load our C kernels for x86-64 CPUs with AVX512-BF16 (attention_cpu.c, geglu_cpu.c,
group_norm_cpu.c, linear_geglu_cpu.c, winograd_cpu.c; shared helpers in the .h files), the fp32 ones
(attention_f32_cpu.c, group_norm_f32_cpu.c, linear_geglu_f32_cpu.c, winograd_f32_cpu.c) for any CPU with AVX-512, and their AVX2
siblings (``*_avx2_cpu.c``) for CPUs without AVX-512. A kernel with siblings binds the first one the CPU
runs (``bind_first``).

Each ``<stem>.c`` has its one declaration, ``<stem>.h``: the entry points ``bind`` sets up with ctypes and the
CPU the library needs (cpu_sources.py parses it). ``load(source)`` returns the library or why it cannot run
here, looking, once the host passes ``machine_reason`` for the kernel:

1. in the package's ``_prebuilt`` folder (compiled when the wheel was built: setup.py), read only;
2. in the cache (``$XDG_CACHE_HOME/diffusion-runtime/kernels``), where ``python -m runtime.kernels.build``
   (scripts/setup.sh) or an earlier process put it;
3. else it compiles the source now with the system C compiler (``$CC``, else ``cc``/``gcc``) into the cache:
   a temporary file renamed, so nothing half-written is ever loaded.

A library's name carries the hash of its sources and flags (cpu_sources.py says which and why), so a stale or
foreign one is never picked up. OpenMP comes from the libgomp torch's CPU build already loaded, so the kernels
share torch's thread pool.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from . import cpu_features, cpu_sources

FLAGS, FP32_FLAGS = cpu_sources.FLAGS, cpu_sources.FP32_FLAGS  # the fp32 kernels need AVX-512 only
_WHAT = {"avx512_bf16": "AVX512-BF16", "avx512": "AVX-512", "avx2": "AVX2"}  # needs -> its name in a reason
ENV_NO_PREBUILT = "DIFFUSION_RUNTIME_NO_PREBUILT"  # "1": ignore the prebuilt libraries (compile as without them)

_lock = threading.Lock()
_loaded: dict[str, tuple[ctypes.CDLL | None, str | None]] = {}
_bound: list[dict] = []  # every state ``bind`` filled, so ``forget`` can empty them
_loaded_ever: dict[str, str] = {}  # source stem -> what it needs (cpu_sources.NEEDS), for every library loaded (kept by forget)
_origins: dict[str, str] = {}  # source stem -> where its library came from ("prebuilt", "cache", "built")


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


def prebuilt_dirs() -> list[Path]:
    """Where libraries built with the package are looked for first (read only: never written at run time)."""
    if os.environ.get(ENV_NO_PREBUILT, "").strip() not in ("", "0"):
        return []
    return [Path(__file__).with_name(cpu_sources.PREBUILT)]


def _compiler() -> str | None:
    return cpu_sources.find_compiler()


def declared(source: Path) -> cpu_sources.Kernel:
    """What ``source``'s header declares (its functions, the CPU it needs)."""
    return cpu_sources.kernel(source)


def machine_reason(bf16: bool = True, needs: str | None = None) -> str | None:
    """None when this machine can run the kernels that need ``needs`` (a key of cpu_sources.NEEDS; without
    it, ``bf16``: those that need AVX512-BF16, else those that need AVX-512 only), else why not. Reads
    cpu_features.current(), which tests can fake."""
    needs = needs or ("avx512_bf16" if bf16 else "avx512")
    cpu = cpu_features.current()
    if not cpu.x86_64:
        return f"our CPU kernels are for x86-64; this machine is {platform.machine()}"
    if not getattr(cpu, needs):
        return f"this CPU has no {_WHAT[needs]}"
    return None


def _open(path: Path, stem: str, needs: str, origin: str) -> tuple[ctypes.CDLL | None, str | None]:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    _loaded_ever[stem] = needs
    _origins[stem] = f"{origin} {path}"
    return lib, None


def _load(source: Path) -> tuple[ctypes.CDLL | None, str | None]:
    try:
        kernel = declared(source)
    except (OSError, cpu_sources.DeclarationError) as e:
        return None, f"the declaration of {source.name}: {e}"
    why = machine_reason(needs=kernel.needs)
    if why:
        return None, why
    # Built with the package for these very sources and flags (the name says so; see cpu_sources.py)
    for folder in prebuilt_dirs():
        path = folder / kernel.library_name()
        if path.is_file():
            lib, _ = _open(path, kernel.stem, kernel.needs, "prebuilt")
            if lib is not None:
                return lib, None  # one that will not load (a foreign libgomp, say): compile as without it
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    path = kernel_cache_dir() / kernel.library_name(compiler)
    if not path.exists():  # a read-only cache that already holds the library is used as it is
        path = _writable_dir(path.parent) / path.name
    origin = "cache"
    if not path.exists():
        why = cpu_sources.compile_kernel(compiler, kernel, path)
        if why:
            return None, why
        origin = "built"
    return _open(path, kernel.stem, kernel.needs, origin)


def load(source: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library of ``source``: prebuilt with the package, else from the cache, else built now (the
    CPU it needs comes from its header), or None and why not. Cached."""
    name = str(source)
    if name not in _loaded:
        with _lock:
            if name not in _loaded:
                _loaded[name] = _load(source)
    return _loaded[name]


def build_cached(source: Path) -> tuple[str, str | None]:
    """Make sure ``source``'s library is in the cache (or prebuilt) without loading it: (what happened, why
    it failed or None). For ``python -m runtime.kernels.build``; safe to run for several sources at once."""
    kernel = declared(source)
    for folder in prebuilt_dirs():
        if (folder / kernel.library_name()).is_file():
            return "prebuilt", None
    compiler = _compiler()
    if compiler is None:
        return "failed", "no C compiler found (set CC, or install gcc)"
    path = kernel_cache_dir() / kernel.library_name(compiler)
    if path.exists():
        return "cached", None
    why = cpu_sources.compile_kernel(compiler, kernel, path)
    return ("failed", why) if why else ("built", None)


_CTYPES = {"c_int": ctypes.c_int, "c_int64": ctypes.c_int64, "c_float": ctypes.c_float,
           "c_double": ctypes.c_double, "c_void_p": ctypes.c_void_p, None: None}


def _remember(state: dict) -> None:
    """Keep ``state`` in the list ``forget`` empties (once)."""
    if not any(state is known for known in _bound):
        _bound.append(state)


def bind(state: dict, source: Path) -> str | None:
    """Fill ``state`` once with the entry points of ``source``'s library, their ``restype``/``argtypes`` from
    the declaration header ``<stem>.h`` (cpu_sources.py), or with ``"why"``; returns why they are unavailable.
    After the first call it only reads ``state`` (it runs once per kernel call)."""
    if not state:
        _remember(state)
        lib, why = load(source)
        if lib is None:
            state["why"] = why
        else:
            entries = {}
            for fn_decl in declared(source).functions:
                try:
                    fn = getattr(lib, fn_decl.name)
                except AttributeError:
                    state["why"] = f"{source.stem}'s library has no {fn_decl.name}, which {source.stem}.h declares"
                    return state["why"]
                fn.restype = _CTYPES[fn_decl.restype]
                fn.argtypes = [_CTYPES[t] for t in fn_decl.argtypes]
                entries[fn_decl.name] = fn
            state.update(entries)
    return state.get("why")


def bind_first(state: dict, sources) -> str | None:
    """``bind(state, source)`` for the first of ``sources`` (siblings declaring the same entry points, most
    demanding CPU first) whose CPU this machine has, recording it as ``state["source"]``; returns why none
    runs (the last one's reason). After the first call it only reads ``state``, as ``bind`` does."""
    if state:
        return state.get("why")
    why = None
    for source in sources:
        try:
            why = machine_reason(needs=declared(source).needs)
        except (OSError, cpu_sources.DeclarationError) as e:
            why = f"the declaration of {Path(source).name}: {e}"
            continue
        if why is None:
            why = bind(state, source)
            state["source"] = Path(source)  # which sibling runs (its entry points are the state's)
            return why
    if not state:
        _remember(state)
        state["why"] = why
    return state.get("why")


def forget() -> None:
    """Drop what ``load`` and ``bind`` cached (tests change the machine's answers and ask again)."""
    with _lock:
        _loaded.clear()
        for state in _bound:
            state.clear()


def origins() -> dict[str, str]:
    """Where each library loaded in this process came from: source stem -> "prebuilt PATH", "cache PATH" (built
    by an earlier process or ``python -m runtime.kernels.build``) or "built PATH" (compiled by this one)."""
    return dict(_origins)


def loaded_on_host() -> list[str]:
    """The kernels (source stems) loaded in this process that the host itself can run: under faked
    flags (cpu_features.assumed) a library may be loaded for a decision on a CPU the host is not."""
    host = cpu_features.host()
    return sorted(stem for stem, needs in _loaded_ever.items() if host.x86_64 and getattr(host, needs))


def profiled(name: str):
    """A profiler range ``name`` around a kernel call while torch's profiler records (bench/profile_step.py
    reads them), else nothing: entering a range has a cost of its own (measured: bench/RESULTS.md,
    'Figures moved from docstrings'), paid a hundred times per UNet call."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else contextlib.nullcontext()
