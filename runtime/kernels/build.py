"""Build now every C kernel this host can run, so that no later process pays a compiler run:
``python -m runtime.kernels.build`` (scripts/setup.sh runs it after ``pip install -e``).

Libraries go to the cache ($XDG_CACHE_HOME/diffusion-runtime/kernels) under the names the first call would
give them, so the first call just loads them; kernels the package ships prebuilt (a wheel install) are left
alone. Kernels the host cannot run (no AVX512-BF16 / AVX-512, not x86-64) are listed and skipped. Each
library built is then loaded and bound, as a call would. Exits 0 unless ``--strict`` and something failed:
a set-up must not fail where the kernels cannot run (their callers fall back to PyTorch's operators).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import cpu_build, cpu_sources


def build(jobs: int | None = None, log=print) -> dict[str, tuple[str, str | None]]:
    """stem -> (what happened: "prebuilt", "cached", "built", "skipped", "failed"; why, or None)."""
    kernels = cpu_sources.kernels(Path(__file__).resolve().parent)
    results: dict[str, tuple[str, str | None]] = {}
    todo = []
    for stem, kernel in kernels.items():
        why = cpu_build.machine_reason(needs=kernel.needs)
        if why:
            results[stem] = ("skipped", why)
        else:
            todo.append(kernel)

    def one(kernel):
        start = time.perf_counter()
        done = cpu_build.build_cached(kernel.source)
        return kernel.stem, done, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=max(1, jobs or len(todo) or 1)) as pool:
        for stem, done, seconds in pool.map(one, todo):
            results[stem] = done
            if done[0] == "built":
                log(f"  {stem}: built in {seconds:.1f} s")
    for kernel in todo:  # load and bind each, as a call would: a library that will not load is a failure too
        if results[kernel.stem][0] != "failed":
            why = cpu_build.bind({}, kernel.source)
            if why:
                results[kernel.stem] = ("failed", why)
    return {stem: results[stem] for stem in kernels}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.kernels.build", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="compilers run at once (default: one per kernel)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a kernel the host can run failed")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"diffusion-runtime: building the CPU kernels into {cpu_build.kernel_cache_dir()}", flush=True)
    results = build(args.jobs, log=lambda line: print(line, flush=True))
    for stem, (what, why) in results.items():
        if what != "built":
            print(f"  {stem}: {what}" + (f" ({why})" if why else ""))
    failed = [stem for stem, (what, _) in results.items() if what == "failed"]
    print(f"diffusion-runtime: kernels ready in {time.perf_counter() - start:.1f} s"
          + (f"; failed: {', '.join(failed)} (their calls fall back to PyTorch)" if failed else ""))
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
