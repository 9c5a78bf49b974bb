"""Long run, shortened: 40 generations in this process (levels 0 and 3, every task and scheduler of
bench/bench_concurrency.py). After a warm-up, RSS grows by less than a bound per request (a
least-squares slope over the second half), and open file descriptors, threads and live tensors
stay flat. bench/bench_long_run.py runs 500 and writes the CSV (and a PNG)."""
from __future__ import annotations

import gc

import pytest

from bench.bench_concurrency import make_requests, run_one
from bench.bench_long_run import run, sample, slope

RSS_SLOPE_BOUND_MIB = 0.05  # 50 KiB per request: 25 MiB over 500; a leak of one 16x16 image a call is ~6 KiB


@pytest.fixture
def pipes(stress_pipes):
    return stress_pipes


def test_resources_level_off(pipes):
    requests = make_requests(40, sizes=(16, 24), steps=(2,), seed=3)
    for req in requests[:10]:  # warm-up: allocator pools, kernel builds, per-thread caches
        run_one(pipes, req)
    gc.collect()
    rows = run(pipes, requests[10:], tensor_every=8)
    s = slope(rows, "rss_mib")
    assert s < RSS_SLOPE_BOUND_MIB, f"RSS grows {s * 1024:.1f} KiB per request: {[r['rss_mib'] for r in rows]}"
    half = rows[len(rows) // 2:]
    assert len({r["open_fds"] for r in half}) == 1, [r["open_fds"] for r in rows]
    assert len({r["threads"] for r in half}) == 1, [r["threads"] for r in rows]
    tensors = [r["live_tensors"] for r in half if r["live_tensors"] != ""]
    assert max(tensors) - min(tensors) <= 2, tensors
