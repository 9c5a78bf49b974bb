"""What measured dispatch costs: the first ``optimize`` on a new machine (an empty dispatch cache) against
one that finds its choices cached, each in a fresh process (runtime/optim/dispatch.py).

    python3 -m bench.bench_dispatch                         # small model, 256x256, level 2, 2 threads
    python3 -m bench.bench_dispatch --model tiny --size 64 --repeats 2
    python3 -m bench.bench_dispatch --model PATH --level 1 --budget 10

Each repeat runs three fresh processes on the same checkpoint: "empty" (a new, empty dispatch cache
folder: every distinct call is timed), "cached" (the folder the empty run filled: nothing is timed) and
"off" (the same level without the three passes that measure: attention, geglu, winograd), and in the
"empty" process a second ``optimize`` ("again, same process"). The kernel cache is this machine's
(``$XDG_CACHE_HOME/diffusion-runtime/kernels``, linked into the temporary cache root), so no process
pays a compiler run; what "empty" adds over "cached" is the measuring. Medians over the repeats.
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
import torch
torch.set_num_threads(int(sys.argv[4]))
import runtime
from runtime.optim import dispatch
pipe = runtime.StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
level, size, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
options = {"height": size, "width": size}
if sys.argv[6] != "default":
    options["budget_s"] = float(sys.argv[6])
off = {"attention": False, "geglu": False, "winograd": False} if mode == "off" else {}
rows = []
for _ in range(2 if mode == "empty" else 1):
    t = time.perf_counter()
    runtime.optimize(pipe, level=level, dispatch=options, **off)
    rows.append({"optimize_s": time.perf_counter() - t, **pipe.optimization.measuring,
                 "choices": {name: sorted({m.choice for m in ms}) for name, ms in pipe.optimization.dispatch.items()}})
print(json.dumps(rows))
"""


def checkpoint(model: str) -> str:
    if Path(model).is_dir():
        return model
    from bench.make_checkpoint import build_checkpoint

    return str(build_checkpoint(model, Path.home() / ".cache" / "diffusion-runtime" / "bench-checkpoints"
                                / f"{model}-seed0"))


def cache_root(tmp: Path) -> Path:
    """A cache root with this machine's kernel libraries linked in and an empty dispatch folder."""
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion-runtime" / "kernels"
    (tmp / "diffusion-runtime").mkdir(parents=True)
    if real.is_dir():
        (tmp / "diffusion-runtime" / "kernels").symlink_to(real)
    return tmp


def child(model: str, level: int, size: int, threads: int, mode: str, budget: str, root: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(root))
    done = subprocess.run([sys.executable, "-c", CHILD, model, str(level), str(size), str(threads), mode, budget],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_dispatch: the {mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="tiny, small, sd15 (bench/make_checkpoint.py) or a folder")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--level", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", default="default", help="seconds of measuring per optimize (default: the library's)")
    args = ap.parse_args(argv)
    model = checkpoint(args.model)
    runs: dict[str, list[dict]] = {"empty": [], "again, same process": [], "cached": [], "off": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = cache_root(Path(tmp))
            common = (model, args.level, args.size, args.threads)
            first, again = child(*common, "empty", args.budget, root)
            runs["empty"].append(first)
            runs["again, same process"].append(again)
            runs["cached"] += child(*common, "cached", args.budget, root)
            runs["off"] += child(*common, "off", args.budget, root)
        print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    print(f"\n{args.model} at {args.size}x{args.size}, level {args.level}, {args.threads} threads, "
          f"{args.repeats} repeats (medians)\n")
    print("| dispatch cache | optimize s | of which timing s | calls timed | from the cache | left unmeasured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in runs.items():
        def med(key):
            values = [r.get(key) for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else float("nan")

        print(f"| {name} | {med('optimize_s'):.2f} | {med('seconds'):.2f} | {med('measured'):.0f} | {med('cached'):.0f} "
              f"| {med('budget spent'):.0f} |")
    print("\nchoices (last empty run):", json.dumps(runs["empty"][-1]["choices"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
