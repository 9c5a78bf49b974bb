"""What the first process pays: load, ``optimize(pipe, level=2)`` and the first call on the shipped model,
with an empty kernel cache ($XDG_CACHE_HOME), against the same process once the kernels exist.

Each measurement is a fresh Python process (nothing warm but the page cache). Modes:

- ``jit``: an empty cache and nothing prebuilt: every C kernel the call needs is compiled on first use.
- ``warm``: the same cache again (what every later process pays): the difference is the compile share.
- ``build``: an empty cache, then ``python -m runtime.kernels.build`` (timed on its own: what
  scripts/setup.sh pays once), then the first process.
- ``wheel``: a wheel built from this checkout (``pip wheel``, compiling the kernels into
  runtime/kernels/_prebuilt), installed with ``pip install --target`` into a read-only folder, then the
  first process with an empty cache; the cache must stay empty.

``kernel_load_s`` is the time the process spent in cpu_build's library lookup (compiling included): the
compile share, free of the call's own noise. ``--root`` runs another tree's ``runtime`` (e.g. an older commit
unpacked with ``git archive``; modes jit and warm only).

Usage: python3 bench/bench_first_call.py [--modes jit,warm,build,wheel] [--steps 4] [--repeats 1] [--root DIR]
Prints one JSON line per run and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
import runtime
from runtime.kernels import cpu_build
_load, in_load = cpu_build._load, [0.0]
def _timed_load(*a, **k):  # the seconds spent finding, compiling and loading kernel libraries
    start = time.perf_counter()
    try:
        return _load(*a, **k)
    finally:
        in_load[0] += time.perf_counter() - start
cpu_build._load = _timed_load
from runtime import optimize
from runtime.cli import default_model
from runtime.pipelines import DiffusionPipeline
t_import = time.perf_counter() - t0
steps = int(sys.argv[1])
start = time.perf_counter()
pipe = DiffusionPipeline.from_pretrained(default_model())
pipe.set_progress_bar_config(disable=True)
t_load = time.perf_counter() - start
start = time.perf_counter()
optimize(pipe, level=2)
t_optimize = time.perf_counter() - start
def call():
    start = time.perf_counter()
    pipe("a large red circle on a blue background", num_inference_steps=steps,
         generator=torch.Generator().manual_seed(0), output_type="pt")
    return time.perf_counter() - start
t_first = call()
t_second = call()
origins = getattr(cpu_build, "origins", lambda: {})()
print(json.dumps({"import_s": t_import, "load_s": t_load, "optimize_s": t_optimize, "first_call_s": t_first,
                  "second_call_s": t_second, "kernel_load_s": in_load[0], "runtime": os.path.dirname(runtime.__file__),
                  "kernels": sorted(cpu_build.loaded_on_host()), "origins": origins}))
"""


def run_child(env: dict, steps: int, cwd: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=1800)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    out["first_process_s"] = out["import_s"] + out["load_s"] + out["optimize_s"] + out["first_call_s"]
    return out


def cache_files(cache: Path) -> list[str]:
    folder = cache / "diffusion-runtime" / "kernels"
    return sorted(p.name for p in folder.glob("*.so")) if folder.is_dir() else []


def make_wheel_install(tmp: Path) -> tuple[Path, float]:
    """A wheel of this checkout installed into a read-only folder; returns (folder, wheel build seconds)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__", "_prebuilt"))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(src), "-w", str(tmp / "dist")], check=True)
    built = time.perf_counter() - start
    (wheel,) = (tmp / "dist").glob("*.whl")
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True)
    for path in [target, *target.rglob("*")]:  # read-only, as a system site-packages is to its users
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    print(f"# wheel {wheel.name}: built in {built:.1f} s", flush=True)
    return target, built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="jit,warm,build,wheel")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree whose runtime/ to run (default: this one)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        site = None
        for rep in range(args.repeats):
            jit_cache = tmp / f"cache-jit-{rep}"
            for mode in modes:
                env = dict(os.environ)
                env.pop("DIFFUSION_RUNTIME_CPU_FLAGS", None)
                env["PYTHONPATH"] = str(args.root)
                cwd = args.root
                extra = {}
                if mode in ("jit", "warm"):
                    cache = jit_cache
                else:
                    cache = tmp / f"cache-{mode}-{rep}"
                env["XDG_CACHE_HOME"] = str(cache)
                if mode == "build":
                    start = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "runtime.kernels.build"], env=env, cwd=ROOT, check=True)
                    extra["setup_build_s"] = time.perf_counter() - start
                elif mode == "wheel":
                    if site is None:
                        site, extra["wheel_build_s"] = make_wheel_install(tmp)
                    env["PYTHONPATH"] = str(site)
                    cwd = tmp  # not the checkout: import runtime from the installed copy
                before = cache_files(cache)
                out = run_child(env, args.steps, cwd)
                out.update(extra, mode=mode, rep=rep, compiled_in_process=len(set(cache_files(cache)) - set(before)))
                print(json.dumps(out), flush=True)
                rows.append(out)
    print("\n| mode | first process s (import + load + optimize + first call) | in kernel lookup s | second call s "
          "| kernels compiled in the process | set-up s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        setup = r.get("setup_build_s", r.get("wheel_build_s"))
        print(f"| {r['mode']} | {r['first_process_s']:.1f} ({r['import_s']:.1f} + {r['load_s']:.1f} + "
              f"{r['optimize_s']:.1f} + {r['first_call_s']:.1f}) | {r['kernel_load_s']:.2f} "
              f"| {r['second_call_s']:.2f} | {r['compiled_in_process']} | {'' if setup is None else f'{setup:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
