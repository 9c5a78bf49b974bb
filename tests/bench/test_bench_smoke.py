"""The benchmark's --quick smoke run produces well-formed rows, a table and a plot (never: that anything is fast).

One run of ``python3 -m bench --quick --no-probe`` (tiny model, 3 steps, 4 configurations) into a
temporary folder, read back like a user's tooling would; the fresh-process probe (peak RSS, first
call) is checked once on its own, to keep the whole file near a minute on a loaded 2-core machine.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICK_CONFIGS = {"diffusers-eager", "ours-eager", "ours-L1", "ours-L3 (compile=False)"}
ROW_KEYS = {"commit", "machine", "timestamp", "command", "config", "status", "reason", "impl", "kind", "compiles",
            "settings", "figures", "parity", "matmul_peaks"}
SETTING_KEYS = {"model", "folder", "height", "width", "steps", "guidance_scale", "prompt", "seed", "warmup", "runs",
                "threads"}
POSITIVE = ("end_to_end_s", "unet_step_s", "speedup_vs_diffusers_eager", "unet_speedup_vs_diffusers_eager",
            "unet_step_gflop", "achieved_gflops", "fraction_of_fp32_peak", "fraction_of_bf16_peak", "first_call_s")
EXACT = 1e-3  # image max-abs in [0, 1] between fp32 eager paths on the same weights and latents


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-probe", "--out", str(out),
                           "--checkpoints", str(root / "ck")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def rows(quick) -> dict[str, dict]:
    lines = (quick / "rows.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    return {r["config"]: r for r in parsed}


def test_one_row_per_quick_configuration(rows):
    assert set(rows) == QUICK_CONFIGS


def test_rows_carry_machine_commit_and_settings(rows):
    for name, row in rows.items():
        assert ROW_KEYS <= set(row), (name, ROW_KEYS - set(row))
        assert SETTING_KEYS <= set(row["settings"]), (name, SETTING_KEYS - set(row["settings"]))
        assert row["settings"]["model"] == "tiny" and row["settings"]["runs"] == 2 and row["settings"]["warmup"] == 1
        machine = row["machine"]
        assert machine["cores"] >= 1 and machine["torch_threads"] >= 1 and machine["cpu"]
        assert machine["versions"]["torch"]
        assert row["status"] in ("ok", "skipped", "error")
        assert (row["reason"] is None) == (row["status"] == "ok"), (name, row["status"], row["reason"])


def test_ok_rows_have_finite_positive_figures(rows):
    ok = {n: r for n, r in rows.items() if r["status"] == "ok"}
    assert {"diffusers-eager", "ours-eager"} <= set(ok), {n: r["reason"] for n, r in rows.items()}
    for name, row in ok.items():
        fig = row["figures"]
        for key in POSITIVE:
            assert isinstance(fig.get(key), (int, float)) and math.isfinite(fig[key]) and fig[key] > 0, (name, key, fig.get(key))
        assert len(fig["end_to_end_runs_s"]) == 2 and fig["unet_calls"] > 0
        for key, value in row["parity"].items():
            assert value is None or (math.isfinite(value) and value >= 0), (name, key, value)
    assert rows["diffusers-eager"]["figures"]["speedup_vs_diffusers_eager"] == 1.0


def test_parity_columns_compare_against_the_right_images(rows):
    """Our eager pipeline reproduces diffusers' image; level 1 is exact; level 3 visibly changes it."""
    assert rows["ours-eager"]["parity"]["max_abs_vs_diffusers_eager"] < EXACT
    assert rows["diffusers-eager"]["parity"]["max_abs_vs_diffusers_eager"] == 0.0
    if rows["ours-L1"]["status"] == "ok":
        assert rows["ours-L1"]["parity"]["max_abs_vs_ours_eager"] < EXACT
    l3 = rows["ours-L3 (compile=False)"]
    if l3["status"] == "ok":
        assert l3["parity"]["max_abs_vs_ours_eager"] > EXACT
        assert l3["optimization"]["applied"], l3["optimization"]


def test_table_and_plot_exist(quick, rows):
    table = (quick / "table.md").read_text()
    for name in rows:
        assert f"| {name} |" in table
    from PIL import Image

    with Image.open(quick / "plot.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_probe_reports_peak_rss_and_first_call(rows):
    """The fresh-process probe the full run uses for peak RSS and compile times, on the quick checkpoint."""
    from dataclasses import asdict

    from bench.configs import quick_specs

    row = rows["ours-L1"]
    spec = next(s for s in quick_specs() if s.name == "ours-L1")
    call = {k: row["settings"][k] for k in ("prompt", "height", "width", "guidance_scale")}
    call["num_inference_steps"] = 2
    done = subprocess.run([sys.executable, "-m", "bench.probe", "--folder", row["settings"]["folder"],
                           "--spec", json.dumps(asdict(spec)), "--call", json.dumps(call)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("load_and_setup_s", "first_call_s", "second_call_s", "peak_rss_mib"):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures)


def test_configurations_applied_around_each_run_are_rewarmed_untimed(monkeypatch):
    """A configuration entered and left around each run gets an untimed short call before its timed one
    (its packed and transformed weights are made again after each apply); the warm-up call does not."""
    import torch

    from bench import pipeline_bench
    from bench.configs import ConfigSpec, Prepared

    calls = []
    monkeypatch.setattr(pipeline_bench, "generate", lambda pipe, call, latents: calls.append(call) or (None, 1.0, []))
    call = {"num_inference_steps": 10}
    shared = Prepared(ConfigSpec("ours-L2", "ours", "level", {"level": 2}), pipe=None, rewarm=True)
    pipeline_bench._run_config(shared, call, torch.zeros(1), timed=False)
    assert [c["num_inference_steps"] for c in calls] == [10]
    calls.clear()
    pipeline_bench._run_config(shared, call, torch.zeros(1))
    assert [c["num_inference_steps"] for c in calls] == [pipeline_bench.REWARM_STEPS, 10]
    calls.clear()
    pipeline_bench._run_config(Prepared(shared.spec, pipe=None), call, torch.zeros(1))  # its own pipeline
    assert [c["num_inference_steps"] for c in calls] == [10]
