"""bench/bench_adherence.py on the shipped model, two prompts and two steps: well-formed rows (never
that something is fast). Level 1 is exact, so its images equal eager's to the pixel or nearly."""
from __future__ import annotations

import json

import pytest

from bench import bench_adherence
from runtime.cli import default_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(default_model() is None, reason="no shipped model yet (issue 6, train/RUNS.md)")]


def test_rows_and_table(tmp_path):
    assert default_model() is not None
    code = bench_adherence.main(["--out", str(tmp_path), "--prompts", "2", "--steps", "2", "--batch", "2",
                                 "--threads", "1", "--no-compile", "--configs", "ours-L1"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["config"] for r in rows] == ["ours-eager", "ours-L1"]
    eager, level1 = rows
    assert "psnr_db_mean" not in eager and level1["psnr_db_mean"] >= 40
    assert level1["optimization"]["level"] == 1
    for row in rows:
        assert set(row["adherence"]) == {"shape", "colour", "background", "position", "size", "overall"}
        assert all(0.0 <= v <= 1.0 for v in row["adherence"].values())
        assert row["s_per_image"] > 0 and row["prompts"] == 2
    table = (tmp_path / "table.md").read_text()
    assert "| ours-eager |" in table and "| ours-L1 |" in table and "reference" in table
