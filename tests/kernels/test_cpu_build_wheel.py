"""The install-time build (setup.py): a wheel built with a compiler carries every kernel prebuilt, and an
install of it runs them with no compiler and an empty, unwritten cache; a wheel built without a compiler is
pure and its install compiles on first use (the JIT fallback)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from runtime.kernels import cpu_build, cpu_sources

ROOT = Path(__file__).resolve().parents[2]
KERNELS = cpu_sources.kernels(ROOT / "runtime" / "kernels")
# an AVX2 sibling is bound through its AVX-512 kernel's wrapper (the first of the two the host runs)
SIBLINGS = {stem: stem.replace("_avx2_cpu", "_cpu") for stem in KERNELS if stem.endswith("_avx2_cpu")}


def bound_by(seen: dict, stem: str) -> tuple[str | None, str | None]:
    """(what ``stem``'s wrapper should say on the probed host, the stem whose library it binds or None)."""
    family = [stem] + [s for s, of in SIBLINGS.items() if of == stem]
    runs = [s for s in family if seen["host"][KERNELS[s].needs] is None]
    return (None, runs[0]) if runs else (seen["host"][KERNELS[family[-1]].needs], None)

PROBE = r"""
import json, sys, torch
from runtime.kernels import attention_cpu, cpu_build, geglu_cpu, group_norm_cpu, linear_geglu_cpu
from runtime.kernels import lora_cpu, winograd_cpu, winograd_f32_cpu
checks = {"attention_cpu": lambda: attention_cpu.cpu_attention_ready(torch.bfloat16),
          "attention_f32_cpu": lambda: attention_cpu.cpu_attention_ready(torch.float32),
          "geglu_cpu": geglu_cpu.cpu_geglu_ready, "group_norm_cpu": group_norm_cpu.cpu_group_norm_ready,
          "group_norm_f32_cpu": lambda: group_norm_cpu.cpu_group_norm_ready(torch.float32),
          "linear_geglu_cpu": lambda: linear_geglu_cpu.cpu_linear_geglu_ready(torch.bfloat16),
          "linear_geglu_f32_cpu": lambda: linear_geglu_cpu.cpu_linear_geglu_ready(torch.float32),
          "lora_cpu": lora_cpu.cpu_lora_term_ready,
          "lora_f32_cpu": lambda: lora_cpu.cpu_lora_term_ready(torch.float32),
          "winograd_cpu": winograd_cpu.cpu_winograd_ready, "winograd_f32_cpu": winograd_f32_cpu.cpu_winograd_f32_ready}
ready = {stem: checks[stem]() for stem in (sys.argv[1:] or checks)}
print(json.dumps({"ready": ready, "origins": cpu_build.origins(), "file": cpu_build.__file__,
                  "host": {n: cpu_build.machine_reason(needs=n) for n in ("avx512_bf16", "avx512", "avx2")}}))
"""

pytestmark = pytest.mark.skipif(not (sys.platform.startswith("linux") and cpu_build.cpu_features.host().x86_64),
                                reason="kernels are prebuilt on Linux x86-64 only")


def _wheel(tmp_path: Path, env: dict) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__", "_prebuilt"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", str(src), "-w", str(tmp_path / "dist")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def _install_and_probe(tmp_path: Path, wheel: Path, env: dict, stems=()) -> dict:
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for p in [site, *site.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)  # read only, as a system-wide install is to its users
    env = dict(env, PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("DIFFUSION_RUNTIME_CPU_FLAGS", None)
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, *stems], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=env)
    finally:
        for p in [site, *site.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)  # so tmp_path can be removed
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(seen["file"]).is_relative_to(site)  # the installed copy, not this checkout
    return seen


@pytest.mark.skipif(cpu_build._compiler() is None, reason="no C compiler: nothing to prebuild")
def test_an_installed_wheel_runs_its_prebuilt_kernels_without_a_compiler(tmp_path):
    import os

    env = dict(os.environ)
    env.pop("DIFFUSION_RUNTIME_PREBUILD", None)
    wheel = _wheel(tmp_path, env)
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = json.loads(z.read("runtime/kernels/_prebuilt/BUILD-INFO.json"))
    expected = {f"runtime/kernels/_prebuilt/{k.library_name()}" for k in KERNELS.values()}
    assert expected <= names and info["failed"] == {}
    seen = _install_and_probe(tmp_path, wheel, dict(env, CC=str(tmp_path / "no-such-compiler")))
    for stem in KERNELS:
        if stem in SIBLINGS:
            continue
        host_why, bound = bound_by(seen, stem)
        assert seen["ready"][stem] == host_why, stem
        if bound is not None:
            assert seen["origins"][bound].startswith("prebuilt "), seen["origins"]
    assert not (tmp_path / "xdg").exists()  # no compiler ran, nothing was written


def test_a_wheel_built_without_a_compiler_is_pure_and_compiles_on_first_use(tmp_path):
    import os

    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"))
    wheel = _wheel(tmp_path, env)
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".so") or "_prebuilt" in n]
    run_env = dict(os.environ)
    run_env.pop("CC", None)
    stems = ["geglu_cpu", "winograd_f32_cpu"]  # one of each CPU: compiling all eight would only cost time
    seen = _install_and_probe(tmp_path, wheel, run_env, stems)
    for stem in stems:
        host_why, bound = bound_by(seen, stem)
        if host_why is not None:
            assert seen["ready"][stem] == host_why
        elif cpu_build._compiler() is not None:
            assert seen["ready"][stem] is None and seen["origins"][bound].startswith("built "), seen
