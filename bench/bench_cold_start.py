"""Cold start, for products that scale to zero: from ``import runtime`` to the first image, per
level 0-3, each in a fresh process, split into import, load, optimize and first call.

    python3 bench/bench_cold_start.py                 # shipped model, warm caches then empty ones
    python3 bench/bench_cold_start.py --model path --levels 0,2 --repeats 3 --out results/cold

"warm": the kernel and compile caches as this machine has them ($XDG_CACHE_HOME or ~/.cache);
"warm, store off": the same, with the derived-weight store off, alternated with "warm" run by run (runtime/optim/derived_store.py): every
weight copy made again, as before the store. "empty": XDG_CACHE_HOME pointed at a new empty folder, so our
CPU kernels are built again and torch.compile (level 2 where it applies) starts cold. One untimed run per level
fills the caches first. "second call" is the same call again in the same process: the
steady state the first call is compared with. The OS page cache is not dropped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import runtime
t1 = time.perf_counter()
pipe = runtime.StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
level = int(sys.argv[2])
if level:
    runtime.optimize(pipe, level=level)
t3 = time.perf_counter()
pipe("a large red circle on a blue background, in the centre", num_inference_steps=int(sys.argv[3]),
     generator=torch.Generator().manual_seed(0))
t4 = time.perf_counter()
pipe("a large red circle on a blue background, in the centre", num_inference_steps=int(sys.argv[3]),
     generator=torch.Generator().manual_seed(0))
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "optimize_s": t3 - t2, "first_call_s": t4 - t3,
                  "total_s": t4 - t0, "second_call_s": t5 - t4}))
"""


def one(model: str, level: int, steps: int, cache: str | None, store: bool = True) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if cache is not None:
        env["XDG_CACHE_HOME"] = cache
    if not store:
        env["DIFFUSION_RUNTIME_DERIVED_DIR"] = "off"
    done = subprocess.run([sys.executable, "-c", CHILD, model, str(level), str(steps)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "runtime" / "assets" / "shapes"))
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for level in map(int, args.levels.split(",")):
        one(args.model, level, args.steps, None)  # fill the caches (dispatch, probe, derived weights)
        runs: dict[str, list] = {"warm": [], "warm, store off": [], "empty": []}
        for _ in range(args.repeats):  # the two warm modes alternated: the page cache treats them alike
            runs["warm"].append(one(args.model, level, args.steps, None))
            runs["warm, store off"].append(one(args.model, level, args.steps, None, store=False))
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                runs["empty"].append(one(args.model, level, args.steps, tmp))
        for caches, done in runs.items():
            row = {"level": level, "caches": caches, "runs": len(done)}
            row.update({k: round(statistics.median(r[k] for r in done), 3) for k in done[0]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| level | caches | import s | load s | optimize s | first call s | total s | second call s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['level']} | {r['caches']} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['optimize_s']:.2f} "
              f"| {r['first_call_s']:.2f} | {r['total_s']:.2f} | {r['second_call_s']:.2f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cold_start.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
