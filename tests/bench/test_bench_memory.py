"""bench/bench_memory.py's children on a tiny VAE (in-process: the figures' plumbing, not the figures)."""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from bench import bench_memory  # noqa: E402


def test_vae_child_reports_peak_rss(tmp_path, capsys):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32,
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  sample_size=32)
    vae.save_pretrained(str(tmp_path / "vae"))
    rows = {}
    for tiling in (False, True):
        argv = ["vae", "--impl", "ours", "--folder", str(tmp_path / "vae"), "--size", "64"] + (["--tiling"] if tiling else [])
        assert bench_memory.main(argv) == 0
        rows[tiling] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for row in rows.values():
        assert row["peak_rss_mib"] >= row["before_mib"] > 0 and row["seconds"] > 0
    assert rows[True]["checksum"] != rows[False]["checksum"]  # 64 px over 32-pixel tiles: tiled
