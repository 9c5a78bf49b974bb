"""Long run: many generations in one process; RSS, open file descriptors, live tensors and threads
must level off. Writes one CSV row per request (and a PNG of RSS against request number when
matplotlib imports: ``pip install -c constraints.txt matplotlib``) and prints the slopes over the second
half of the run. The 500-request run's CSV and plot are kept in bench/figures/.

    python3 bench/bench_long_run.py --requests 500 --out results/long     # shipped model, levels 0 and 3

tests/reliability/test_reliability_long_run.py checks a slope bound on a shorter run of the tiny model.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402
from bench.bench_concurrency import build_pipes, make_requests, run_one  # noqa: E402

FIELDS = ("request", "seconds", "rss_mib", "open_fds", "threads", "live_tensors")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def sample(i: int, seconds: float, count_tensors: bool) -> dict:
    return {"request": i, "seconds": round(seconds, 4), "rss_mib": round(rss_mib(), 2), "open_fds": open_fds(),
            "threads": threading.active_count(), "live_tensors": live_tensors() if count_tensors else ""}


def run(pipes: dict, requests, tensor_every: int = 10) -> list[dict]:
    rows = []
    for req in requests:
        res = run_one(pipes, req)
        del res
        gc.collect()
        rows.append(sample(req.index, 0.0, req.index % tensor_every == 0))
    return rows


def slope(rows: list[dict], key: str, tail: float = 0.5) -> float:
    """Least-squares slope of ``key`` per request over the last ``tail`` of the rows."""
    pts = [(r["request"], float(r[key])) for r in rows[int(len(rows) * (1 - tail)):] if r[key] != ""]
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def write(rows: list[dict], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "long_run.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    written = [str(out / "long_run.csv")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["request"] for r in rows], [r["rss_mib"] for r in rows])
    ax.set_xlabel("request")
    ax.set_ylabel("RSS (MiB)")
    fig.tight_layout()
    fig.savefig(out / "long_run_rss.png", dpi=120)
    written.append(str(out / "long_run_rss.png"))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(runtime.__file__).parent / "assets" / "shapes"))
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--sizes", default="64,48")
    ap.add_argument("--steps", default="4")
    ap.add_argument("--out", default="results/long")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipes = build_pipes(args.model)
    requests = make_requests(args.requests, sizes=tuple(map(int, args.sizes.split(","))),
                             steps=tuple(map(int, args.steps.split(","))), seed=2)
    rows = []
    for req in requests:
        t0 = time.perf_counter()
        res = run_one(pipes, req)
        del res
        gc.collect()
        rows.append(sample(req.index, time.perf_counter() - t0, req.index % 10 == 0))
    files = write(rows, Path(args.out))
    summary = {"requests": len(rows), "wall_s": round(time.perf_counter() - start, 1),
               "rss_first_mib": rows[0]["rss_mib"], "rss_last_mib": rows[-1]["rss_mib"],
               "rss_slope_kib_per_request_second_half": round(slope(rows, "rss_mib") * 1024, 2),
               "fds": sorted({r["open_fds"] for r in rows[len(rows) // 2:]}),
               "threads": sorted({r["threads"] for r in rows[len(rows) // 2:]}),
               "live_tensors_slope_second_half": round(slope(rows, "live_tensors"), 4), "files": files}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
