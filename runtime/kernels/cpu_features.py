"""What the host CPU has, in the one place every CPU decision reads it from.

The C kernels' build (cpu_build.py), the precision pass's choice of bf16 and the machine key of the
measured-dispatch cache (runtime/optim/dispatch.py) all ask ``current()``. It reads the flags PyTorch's own
dispatcher probes (``torch.cpu._is_avx512_supported`` and friends) on every call, so nothing is
cached that a change of answer could leave stale.

Tests decide on flag sets the host does not have with ``assumed(...)``: the decision logic (what a
pass takes, which attention backend "auto" picks, why a kernel is unavailable) then runs as it would
on that CPU. Only decisions may be taken under a flag the host lacks: a kernel built for AVX512-BF16
and *run* on a CPU without it dies of an illegal instruction. ``assumed`` with flags the host lacks
is for code that decides, never for code that computes.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, fields, replace

import torch

# The flags, by the names lscpu prints them (avx2: AVX2 with FMA; amx: the tile unit, amx_tile).
FLAGS = ("avx2", "avx512", "avx512_bf16", "amx")
_PROBES = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
           "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
_IMPLIES_AVX2 = ("avx512", "avx512_bf16", "amx")  # every CPU with one of these has AVX2 and FMA


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets our CPU kernels and passes decide on."""

    x86_64: bool
    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    amx: bool = False

    def __post_init__(self):
        if any(getattr(self, f) for f in _IMPLIES_AVX2) and not self.avx2:
            object.__setattr__(self, "avx2", True)

    @classmethod
    def of(cls, *flags: str, x86_64: bool = True) -> "CpuFeatures":
        """A flag set by name: ``CpuFeatures.of("avx512", "avx512_bf16")`` (AVX2 comes with any AVX-512 flag)."""
        unknown = set(flags) - set(FLAGS)
        if unknown:
            raise ValueError(f"unknown CPU flag(s) {sorted(unknown)}; known: {', '.join(FLAGS)}")
        return cls(x86_64=x86_64, **{f: f in flags for f in FLAGS})

    def flags(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if f.name != "x86_64" and getattr(self, f.name))

    def describe(self) -> str:
        if not self.x86_64:
            return "not x86-64"
        have = self.flags()
        return " ".join(have) if have else "no AVX2"

    def without(self, *flags: str) -> "CpuFeatures":
        return replace(self, **{f: False for f in CpuFeatures.of(*flags).flags()})


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn is not None and fn())
    except RuntimeError:
        return False


ENV = "DIFFUSION_RUNTIME_CPU_FLAGS"


def _allowed() -> set[str] | None:
    """The flags ``$DIFFUSION_RUNTIME_CPU_FLAGS`` lets us use ("avx512,avx512_bf16", or "none"), or None."""
    text = os.environ.get(ENV)
    if text is None or not text.strip():
        return None
    names = {n.strip().lower() for n in text.split(",") if n.strip()} - {"none"}
    unknown = names - set(FLAGS)
    if unknown:
        raise ValueError(f"${ENV}={text!r}: unknown CPU flag(s) {sorted(unknown)}; known: {', '.join(FLAGS)}, or none")
    return names


def host() -> CpuFeatures:
    """What this machine's CPU has (PyTorch's probes, read now), less any flag ``$DIFFUSION_RUNTIME_CPU_FLAGS``
    leaves out: setting it can only take flags away (to run as on a smaller CPU), never add one. A list
    that keeps an AVX-512 flag keeps AVX2 too; ``none`` takes every flag away, AVX2's included."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CpuFeatures(x86_64=False)
    allowed = _allowed()
    if allowed is not None and allowed & set(_IMPLIES_AVX2):
        allowed = allowed | {"avx2"}
    return CpuFeatures(x86_64=True, **{flag: _probe(probe) and (allowed is None or flag in allowed)
                                       for flag, probe in _PROBES.items()})


def model_name() -> str:
    """The CPU's model name as lscpu prints it (``/proc/cpuinfo``), else the platform's word."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_assumed: CpuFeatures | None = None


def current() -> CpuFeatures:
    """The flags decisions are taken on: the host's, or those ``assumed`` for a test."""
    return _assumed if _assumed is not None else host()


@contextlib.contextmanager
def assumed(features: CpuFeatures):
    """Decide as on a CPU with ``features`` inside the block (tests; see the module docstring). The
    kernels' cached availability is dropped on the way in and out, so each side sees its own CPU."""
    from . import cpu_build

    global _assumed
    before = _assumed
    _assumed = features
    cpu_build.forget()
    try:
        yield features
    finally:
        _assumed = before
        cpu_build.forget()
