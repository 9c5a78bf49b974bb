"""A/B of optimization levels between two source trees, alternated, one fresh process per run.

``python3 -m bench.ab_levels --a /tmp/base --b . --model-dir DIR --levels 1,2,3 --rounds 2``

Each run imports ``runtime`` from one tree (``PYTHONPATH``), loads the pipeline, applies the level,
makes one warm-up call and times ``--calls`` calls (median). Runs alternate A, B (then B, A on the
next round) for each level, so drift on a shared machine falls on both sides. Prints a markdown
table of the medians over rounds and B/A.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import runtime
from runtime import optim
pipe = runtime.StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
level, steps, size, calls = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
optim.optimize(pipe, level=level)
def call():
    return pipe("a red circle on a blue background", num_inference_steps=steps, height=size, width=size,
                generator=torch.Generator().manual_seed(0), output_type="np").images
first = call()
times = []
for _ in range(calls):
    t = time.perf_counter(); out = call(); times.append(time.perf_counter() - t)
print(json.dumps({"median_s": statistics.median(times), "applied": [p.name for p in pipe.optimization.applied],
                  "checksum": float(abs(out).sum())}))
"""


def one(root: str, folder: str, level: int, threads: int, steps: int, size: int, calls: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(root).resolve())}
    done = subprocess.run([sys.executable, "-c", CHILD, folder, str(level), str(threads), str(steps), str(size),
                           str(calls)], env=env, capture_output=True, text=True, cwd=str(Path(root).resolve()))
    if done.returncode != 0:
        raise RuntimeError(f"{root} level {level}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="tree A (the baseline)")
    ap.add_argument("--b", required=True, help="tree B")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--calls", type=int, default=2)
    args = ap.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    rows = {lv: {"a": [], "b": [], "applied": None, "same": True} for lv in levels}
    for r in range(args.rounds):
        for lv in levels:
            sides = ("a", "b") if r % 2 == 0 else ("b", "a")
            got = {}
            for side in sides:
                got[side] = one(getattr(args, side), args.model_dir, lv, args.threads, args.steps, args.size, args.calls)
                rows[lv][side].append(got[side]["median_s"])
                print(f"round {r} level {lv} {side}: {got[side]['median_s']:.3f} s", file=sys.stderr, flush=True)
            rows[lv]["applied"] = got["b"]["applied"]
            rows[lv]["same"] &= got["a"]["applied"] == got["b"]["applied"]
    print("| level | A median s | B median s | B/A | passes applied (same on both) |")
    print("| --- | --- | --- | --- | --- |")
    for lv, row in rows.items():
        a, b = statistics.median(row["a"]), statistics.median(row["b"])
        print(f"| {lv} | {a:.3f} | {b:.3f} | {b / a:.3f} | {', '.join(row['applied'])} ({'yes' if row['same'] else 'NO'}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
