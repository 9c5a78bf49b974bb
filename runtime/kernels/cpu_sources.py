"""The C kernels as declared: which sources there are, what each exports, what it needs, how it is compiled
and what its library is named. Standard library only and no package imports: setup.py loads this file by
path at wheel-build time (where neither torch nor the package is importable), cpu_build.py at run time.

One declaration per kernel: ``<stem>.c`` exports the functions declared in ``<stem>.h`` beside it, in a
restricted C syntax this module parses (``parse_header``): one prototype per ``;``, the return type ``void``,
``int``, ``int64_t``, ``float`` or ``double``, each parameter one of those scalars or a pointer to any of
those or ``uint16_t``/``char`` (``const`` allowed), passed as ``void *`` (a tensor's ``data_ptr()``, ``None``,
or a ctypes array). A comment line ``needs: avx512_bf16``, ``needs: avx512`` or ``needs: avx2`` says which CPU
the library runs on (the flags it is built with: ``NEEDS``). The build force-includes the header (``-include <stem>.h``), so a
definition that disagrees with its declaration is a compile error, and tests/kernels/test_cpu_build.py
checks that each library exports exactly the declared names.

Library names, ``<stem>-<key>.so``, the key a hash of the source, every header in the folder and the
flags, and:

- in the cache ($XDG_CACHE_HOME/diffusion-runtime/kernels, built at run time), also the compiler's name:
  a cache entry is what that compiler made, so changing ``$CC`` builds again;
- in the package's ``_prebuilt`` folder (built when the wheel was), not the compiler: the run-time
  compiler has nothing to do with a library compiled elsewhere, and a host with no compiler at all, where
  a prebuilt library matters most, must still find it. What the key guarantees is the one thing a stale
  or foreign library could get wrong: it was built from these very sources and headers with these flags.
  Which compiler built it is written beside it (``BUILD-INFO.json``), for people, not for the lookup.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREBUILT = "_prebuilt"  # the folder in the installed package (runtime/kernels/_prebuilt) that holds prebuilt libraries

FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
         "-shared", "-fPIC")
# Kernels that compute in fp32 only need AVX-512 (F, BW, VL): built without the bf16 extension, they
# also run on CPUs without it (Intel Skylake-SP and Cascade Lake servers).
FP32_FLAGS = tuple(f for f in FLAGS if f != "-mavx512bf16")
# The AVX2 siblings of the fp32 kernels, for x86-64 CPUs without AVX-512 (AMD Zen 2 and Zen 3, Intel
# client cores): AVX2 and FMA only.
AVX2_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")

# The header's ``needs:`` -> the flags its library is built with, least demanding last
NEEDS = {"avx512_bf16": FLAGS, "avx512": FP32_FLAGS, "avx2": AVX2_FLAGS}
SCALARS = {"void": None, "int": "c_int", "int64_t": "c_int64", "float": "c_float", "double": "c_double"}
POINTEES = set(SCALARS) | {"uint16_t", "char"}


class DeclarationError(ValueError):
    """A header outside the restricted syntax, or a source without its header."""


@dataclass(frozen=True)
class Function:
    name: str
    restype: str | None  # a ctypes name ("c_int"), None for void
    argtypes: tuple[str, ...]  # ctypes names; every pointer is "c_void_p"


@dataclass(frozen=True)
class Kernel:
    stem: str
    source: Path
    header: Path
    needs: str  # the CPU it runs on: "avx512_bf16", "avx512" (AVX-512 F/BW/VL) or "avx2" (AVX2 and FMA)
    functions: tuple[Function, ...]

    @property
    def bf16(self) -> bool:
        """Whether it needs AVX512-BF16."""
        return self.needs == "avx512_bf16"

    @property
    def flags(self) -> tuple[str, ...]:
        """The compiler's arguments but the source and output (run in the source's folder)."""
        return NEEDS[self.needs] + ("-include", self.header.name)

    def key(self, compiler: str | None = None) -> str:
        """The library's hash: source, every header of the folder, the flags, and ``compiler`` for a cache
        entry (None: a prebuilt library's key; see the module docstring)."""
        parts = [self.source.read_bytes()] + [h.read_bytes() for h in sorted(self.source.parent.glob("*.h"))]
        tail = " ".join(((compiler,) if compiler else ("prebuilt",)) + self.flags)
        return hashlib.sha256(b"".join(parts) + tail.encode()).hexdigest()[:16]

    def library_name(self, compiler: str | None = None) -> str:
        return f"{self.stem}-{self.key(compiler)}.so"


_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_PROTO = re.compile(r"^(?P<ret>[A-Za-z_][\w\s\*]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\((?P<params>[^()]*)\)$", re.S)
_NEEDS = re.compile(r"\bneeds:\s*(\w+)")


def _ctype(text: str, where: str, param: bool) -> str | None:
    """The ctypes name of a declared type (``const uint16_t *x`` -> c_void_p); raises outside the syntax."""
    words = text.replace("*", " * ").split()
    pointers = words.count("*")
    words = [w for w in words if w not in ("*", "const")]
    if param:
        if len(words) != 2:
            raise DeclarationError(f"{where}: want '[const] TYPE [*]NAME', got {text.strip()!r}")
        words = words[:1]
    if len(words) != 1:
        raise DeclarationError(f"{where}: want one type name, got {text.strip()!r}")
    base = words[0]
    if pointers:
        if base not in POINTEES or pointers > 1:
            raise DeclarationError(f"{where}: pointer type {text.strip()!r} is not one of {sorted(POINTEES)} *")
        return "c_void_p"
    if base not in SCALARS or (param and base == "void"):
        raise DeclarationError(f"{where}: type {base!r} is not one of {sorted(t for t in SCALARS if t != 'void')}")
    return SCALARS[base]


def parse_header(text: str, where: str = "header") -> tuple[str, tuple[Function, ...]]:
    """(what it needs: a key of NEEDS, the declared functions) of a declaration header's text."""
    needs = _NEEDS.findall(text)
    if len(needs) != 1 or needs[0] not in NEEDS:
        raise DeclarationError(f"{where}: want one 'needs:' line naming one of {', '.join(NEEDS)}, got {needs}")
    body = "\n".join(line for line in _COMMENT.sub(" ", text).splitlines() if not line.lstrip().startswith("#"))
    functions = []
    for stmt in body.split(";"):
        stmt = " ".join(stmt.split())
        if not stmt:
            continue
        m = _PROTO.match(stmt)
        if not m:
            raise DeclarationError(f"{where}: not a prototype: {stmt!r}")
        name = m["name"]
        params = [p for p in m["params"].split(",") if p.strip()]
        if [p.strip() for p in params] == ["void"]:
            params = []
        functions.append(Function(name, _ctype(m["ret"], f"{where}: {name} returns", param=False),
                                  tuple(_ctype(p, f"{where}: {name}", param=True) for p in params)))
    if not functions:
        raise DeclarationError(f"{where}: declares no function")
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise DeclarationError(f"{where}: a function is declared twice: {names}")
    return needs[0], tuple(functions)


def kernel(source: Path) -> Kernel:
    """The kernel of ``source`` (a .c file) as its header declares it."""
    source = Path(source)
    header = source.with_suffix(".h")
    if not header.is_file():
        raise DeclarationError(f"{source.name} has no declaration header {header.name}")
    needs, functions = parse_header(header.read_text(encoding="utf-8"), header.name)
    return Kernel(source.stem, source, header, needs, functions)


def kernels(folder: Path = HERE) -> dict[str, Kernel]:
    """Every kernel of ``folder``: each .c with its header, by stem."""
    return {src.stem: kernel(src) for src in sorted(Path(folder).glob("*.c"))}


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def compile_kernel(compiler: str, k: Kernel, target: Path) -> str | None:
    """Compile ``k`` into ``target`` (a temporary file renamed, so a half-written library is never seen);
    None, or why it failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *k.flags, k.source.name, "-o", tmp], cwd=k.source.parent,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            tail = next((line for line in lines if "error" in line), lines[-1])
            return f"building {k.source.name} with {compiler} failed (exit {done.returncode}): {tail}"
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: a library others (a system install) can read
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f"building {k.source.name} with {compiler} failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return (done.stdout.strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.SubprocessError) as e:
        return f"? ({e})"


def build_prebuilt(dest: Path, folder: Path = HERE, compiler: str | None = None, jobs: int | None = None,
                   log=print) -> dict[str, str | None]:
    """Compile every kernel of ``folder`` into ``dest`` under its prebuilt name (the wheel's build step;
    the host's own CPU does not matter: compiling needs no AVX-512). Returns stem -> None or why it failed;
    never raises for a failed compile. Writes ``BUILD-INFO.json`` (compiler, flags, results)."""
    compiler = compiler or find_compiler()
    found = kernels(folder)
    if compiler is None:
        return {stem: "no C compiler found" for stem in found}
    dest = Path(dest)

    def one(k: Kernel):
        return k.stem, compile_kernel(compiler, k, dest / k.library_name())

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        results = dict(pool.map(one, found.values()))
    for stem, why in results.items():
        log(f"diffusion-runtime: prebuilt {stem}: {'ok' if why is None else why}")
    if any(why is None for why in results.values()):
        info = {"compiler": compiler, "version": compiler_version(compiler),
                "libraries": {stem: found[stem].library_name() for stem, why in results.items() if why is None},
                "failed": {stem: why for stem, why in results.items() if why is not None},
                "flags": {stem: list(found[stem].flags) for stem in found}}
        (dest / "BUILD-INFO.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return results
