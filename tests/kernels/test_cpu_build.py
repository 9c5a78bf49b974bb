"""The C kernels' declarations, build and lookup (runtime/kernels/cpu_sources.py, cpu_build.py, build.py):
one header per kernel is what is bound and what the library exports; prebuilt libraries are found first,
only for these very sources and only on a CPU that can run them; the JIT build stays the fallback."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from runtime.kernels import build as kbuild
from runtime.kernels import cpu_build, cpu_sources

FOLDER = Path(cpu_sources.__file__).resolve().parent
KERNELS = cpu_sources.kernels(FOLDER)
needs_compiler = pytest.mark.skipif(cpu_build._compiler() is None or not cpu_build.cpu_features.host().x86_64,
                                    reason="no C compiler, or not x86-64 (the kernels do not build)")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Nothing loaded, an empty cache, and a prebuilt folder of our own (empty)."""
    cpu_build.forget()
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpu_build, "_origins", {})
    cache, prebuilt = tmp_path / "cache", tmp_path / "prebuilt"
    prebuilt.mkdir()
    monkeypatch.setattr(cpu_build, "kernel_cache_dir", lambda: cache)
    monkeypatch.setattr(cpu_build, "prebuilt_dirs", lambda: [prebuilt])
    yield cache, prebuilt
    cpu_build.forget()


def test_every_source_has_one_parsable_declaration():
    sources = sorted(p.stem for p in FOLDER.glob("*.c"))
    assert sorted(KERNELS) == sources and len(sources) == 12
    # no entry point declared twice, in one header or two, but by an AVX2 sibling, which declares exactly
    # its AVX-512 kernel's (one wrapper binds whichever the CPU runs)
    siblings = {stem: stem.replace("_avx2_cpu", "_cpu") for stem in KERNELS if stem.endswith("_avx2_cpu")}
    for stem, of in siblings.items():
        assert KERNELS[stem].needs == "avx2" and KERNELS[of].needs == "avx512"
        assert KERNELS[stem].functions == KERNELS[of].functions
    names = [f.name for k in KERNELS.values() if k.stem not in siblings for f in k.functions]
    assert len(names) == len(set(names))
    assert {k.stem for k in KERNELS.values() if not k.bf16} == {"attention_f32_cpu", "group_norm_f32_cpu",
                                                                  "linear_geglu_f32_cpu", "lora_f32_cpu", "winograd_f32_cpu",
                                                                  "winograd_f32_avx2_cpu"}
    (attn,) = KERNELS["attention_cpu"].functions
    assert attn.name == "dr_attention_bf16" and attn.restype == "c_int"
    assert attn.argtypes == ("c_void_p",) * 4 + ("c_int",) * 5 + ("c_void_p",) * 4 + ("c_float", "c_int")
    (geglu,) = KERNELS["geglu_cpu"].functions
    assert geglu.restype is None and geglu.argtypes == ("c_void_p", "c_void_p", "c_int64", "c_int", "c_int64",
                                                         "c_int64", "c_int")


@pytest.mark.parametrize("text, match", [
    ("void f(int x);", "needs"),
    ("// needs: sse4\nvoid f(int x);", "needs"),
    ("// needs: avx512\nvoid f(long x);", "not one of"),
    ("// needs: avx512\nvoid f(struct s *x);", "TYPE"),
    ("// needs: avx512\nvoid f(int);", "TYPE"),
    ("// needs: avx512\nvoid f(float **x);", "pointer"),
    ("// needs: avx512\nvoid f(int x); void f(int y);", "twice"),
    ("// needs: avx512\n#include <stdint.h>\n", "no function"),
    ("// needs: avx512\ntypedef int myint;", "not a prototype"),
])
def test_declarations_outside_the_restricted_syntax_are_refused(text, match):
    with pytest.raises(cpu_sources.DeclarationError, match=match):
        cpu_sources.parse_header(text)


def test_the_syntax_it_takes():
    bf16, (f, g) = cpu_sources.parse_header("/* needs: avx512_bf16 */\n#pragma once\n"
                                            "double f(const char *s, int64_t n, double x, float *out) ;\n"
                                            "void  g( void );  // a comment; with a semicolon\n")
    assert bf16 and f.restype == "c_double" and f.argtypes == ("c_void_p", "c_int64", "c_double", "c_void_p")
    assert g.name == "g" and g.restype is None and g.argtypes == ()


def _exported(path: Path) -> set[str] | None:
    """The functions a library exports (nm -D), or None without nm."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    out = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if len(line.split()) == 3 and line.split()[1] in "TtWi"}


@needs_compiler
@pytest.mark.parametrize("stem", sorted(KERNELS))
def test_each_library_exports_exactly_what_its_header_declares(stem):
    kernel = KERNELS[stem]
    what, why = cpu_build.build_cached(kernel.source)  # the cache's library (or the package's prebuilt one)
    assert why is None, why
    names = {f.name for f in kernel.functions}
    candidates = [d / kernel.library_name() for d in cpu_build.prebuilt_dirs()]
    candidates.append(cpu_build.kernel_cache_dir() / kernel.library_name(cpu_build._compiler()))
    path = next(p for p in candidates if p.is_file())
    exported = _exported(path)
    if exported is None:  # no nm: at least every declared name resolves (needs a CPU that can load it)
        if cpu_build.machine_reason(needs=kernel.needs) is None:
            lib = ctypes.CDLL(str(path))
            assert all(hasattr(lib, n) for n in names)
        return
    assert exported == names


@needs_compiler
def test_a_definition_that_disagrees_with_its_declaration_does_not_build(tmp_path):
    for p in FOLDER.glob("*.h"):
        shutil.copy(p, tmp_path / p.name)
    shutil.copy(FOLDER / "geglu_cpu.c", tmp_path / "geglu_cpu.c")
    header = tmp_path / "geglu_cpu.h"
    header.write_text(header.read_text().replace("int64_t rows", "int rows"))
    kernel = cpu_sources.kernel(tmp_path / "geglu_cpu.c")
    why = cpu_sources.compile_kernel(cpu_build._compiler(), kernel, tmp_path / "out" / kernel.library_name())
    assert why is not None and "geglu_cpu.c" in why and "conflicting" in why
    assert not (tmp_path / "out" / kernel.library_name()).exists()


def test_keys_cover_sources_headers_and_flags_and_the_cache_key_the_compiler(tmp_path):
    for p in [*FOLDER.glob("*.h"), FOLDER / "geglu_cpu.c"]:
        shutil.copy(p, tmp_path / p.name)
    kernel = cpu_sources.kernel(tmp_path / "geglu_cpu.c")
    assert kernel.key() == KERNELS["geglu_cpu"].key()  # content, not location: a wheel's copy has the same
    assert kernel.key("gcc") != kernel.key() and kernel.key("gcc") != kernel.key("clang")
    before = kernel.key()
    (tmp_path / "cpu_math.h").write_text((tmp_path / "cpu_math.h").read_text() + "\n")
    assert cpu_sources.kernel(tmp_path / "geglu_cpu.c").key() != before


def _fake_cpu(monkeypatch, bf16: bool, avx512: bool = True):
    monkeypatch.delenv("DIFFUSION_RUNTIME_CPU_FLAGS", raising=False)  # the faked probes are the host now
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512, raising=False)


def _a_library(kernel) -> Path:
    """A real library of ``kernel`` (from the ordinary cache, built there if need be)."""
    path = Path(cpu_build.kernel_cache_dir()) / kernel.library_name(cpu_build._compiler())
    if not path.exists():
        assert cpu_sources.compile_kernel(cpu_build._compiler(), kernel, path) is None
    return path


@needs_compiler
def test_a_prebuilt_library_is_loaded_first_without_a_compiler_and_nothing_is_written(monkeypatch, tmp_path):
    kernel = KERNELS["winograd_f32_cpu"]
    real = _a_library(kernel)
    cpu_build.forget()
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpu_build, "_origins", {})
    cache, prebuilt = tmp_path / "cache", tmp_path / "prebuilt"
    prebuilt.mkdir()
    shutil.copy(real, prebuilt / kernel.library_name())
    prebuilt.chmod(0o555)
    monkeypatch.setattr(cpu_build, "kernel_cache_dir", lambda: cache)
    monkeypatch.setattr(cpu_build, "prebuilt_dirs", lambda: [prebuilt])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    try:
        if cpu_build.machine_reason(bf16=False) is not None:
            pytest.skip("this CPU cannot load the fp32 kernels")
        from runtime.kernels import winograd_f32_cpu

        monkeypatch.setattr(winograd_f32_cpu, "_state", {})
        assert winograd_f32_cpu.cpu_winograd_f32_ready() is None
        assert cpu_build.origins()["winograd_f32_cpu"].startswith(f"prebuilt {prebuilt}")
        assert not cache.exists() and sorted(p.name for p in prebuilt.iterdir()) == [kernel.library_name()]
        x, w = torch.randn(1, 32, 6, 6), torch.randn(32, 32, 3, 3) / 17
        out = winograd_f32_cpu.cpu_winograd_conv3x3_f32(x, winograd_f32_cpu.winograd_weight_f32(w), None)
        assert (out - torch.nn.functional.conv2d(x, w, padding=1)).abs().max() <= 1e-4
    finally:
        prebuilt.chmod(0o755)
        cpu_build.forget()


@needs_compiler
def test_stale_or_foreign_prebuilt_libraries_are_never_loaded(fresh, monkeypatch, tmp_path):
    cache, prebuilt = fresh
    kernel = KERNELS["geglu_cpu"]
    real = _a_library(KERNELS["winograd_f32_cpu"])
    # an older geglu_cpu (another key), and another kernel's library under a name of geglu_cpu's pattern
    shutil.copy(real, prebuilt / "geglu_cpu-0123456789abcdef.so")
    shutil.copy(real, prebuilt / f"geglu_cpu-{KERNELS['winograd_f32_cpu'].key()}.so")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    _fake_cpu(monkeypatch, bf16=True)
    lib, why = cpu_build.load(kernel.source)
    assert lib is None and "no-such-compiler" in why  # it went on to the JIT build, which has no compiler
    assert "geglu_cpu" not in cpu_build.origins()


@needs_compiler
def test_a_prebuilt_library_that_will_not_load_falls_back_to_the_jit_build(fresh):
    cache, prebuilt = fresh
    kernel = KERNELS["winograd_f32_cpu"]
    if cpu_build.machine_reason(bf16=False) is not None:
        pytest.skip("this CPU cannot load the fp32 kernels")
    (prebuilt / kernel.library_name()).write_bytes(b"not a library")
    lib, why = cpu_build.load(kernel.source)
    assert why is None and lib is not None
    assert cpu_build.origins()["winograd_f32_cpu"] == f"built {cache / kernel.library_name(cpu_build._compiler())}"


@needs_compiler
def test_a_prebuilt_library_is_not_loaded_on_a_cpu_without_what_it_needs(fresh, monkeypatch):
    cache, prebuilt = fresh
    kernel = KERNELS["geglu_cpu"]
    (prebuilt / kernel.library_name()).write_bytes(b"would die of an illegal instruction")
    _fake_cpu(monkeypatch, bf16=False)
    assert cpu_build.load(kernel.source) == (None, "this CPU has no AVX512-BF16")
    _fake_cpu(monkeypatch, bf16=False, avx512=False)
    cpu_build.forget()
    assert cpu_build.load(KERNELS["winograd_f32_cpu"].source) == (None, "this CPU has no AVX-512")
    assert cpu_build.origins() == {} and not cache.exists()


def test_the_environment_can_turn_the_prebuilt_libraries_off(monkeypatch):
    monkeypatch.delenv(cpu_build.ENV_NO_PREBUILT, raising=False)
    assert cpu_build.prebuilt_dirs() == [FOLDER / cpu_sources.PREBUILT]
    monkeypatch.setenv(cpu_build.ENV_NO_PREBUILT, "1")
    assert cpu_build.prebuilt_dirs() == []


@needs_compiler
def test_build_fills_the_cache_with_what_the_host_runs(monkeypatch, capsys):
    """``python -m runtime.kernels.build``: every kernel the host runs is then in the cache (or prebuilt) and
    loads from there without a compiler run; under fewer flags the others are skipped with their reason."""
    cpu_build.forget()
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpu_build, "_origins", {})
    monkeypatch.setenv(cpu_build.cpu_features.ENV, "avx512")
    try:
        assert kbuild.main([]) == 0
        out = capsys.readouterr().out
        results = kbuild.build()
        assert sorted(results) == sorted(KERNELS)
        for stem, (what, why) in results.items():
            if KERNELS[stem].bf16:
                assert (what, why) == ("skipped", "this CPU has no AVX512-BF16"), out
            elif cpu_build.machine_reason(needs=KERNELS[stem].needs) is None:
                assert what in ("cached", "prebuilt") and why is None, out
                assert cpu_build.origins()[stem].split()[0] in ("cache", "prebuilt")
    finally:
        cpu_build.forget()
