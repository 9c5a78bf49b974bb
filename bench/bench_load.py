"""from_pretrained time, ours vs diffusers, on the same folder (a random ~72M-parameter SD-like UNet).

Runs alternate (ours, diffusers, ours, ...) after one warm-up each so the page cache and the
machine's noise hit both equally; prints medians and the ratio. Usage: python3 bench/bench_load.py
Without accelerate installed, diffusers builds on the CPU with random init and copies the weights
in; with it, diffusers loads on meta as we do (its fastest path): the header line says which.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = dict(  # the "small" model of /work/shared/MEASURED.md
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[128, 256, 512],
    layers_per_block=2,
    cross_attention_dim=512,
    attention_head_dim=8,
)


def timed(fn) -> float:
    start = time.perf_counter()
    model = fn()
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    import diffusers

    from runtime.models.unet_2d_condition import UNet2DConditionModel

    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ref = diffusers.UNet2DConditionModel(**CONFIG)
        params = sum(p.numel() for p in ref.parameters())
        ref.save_pretrained(tmp)
        del ref
        ours_fn = lambda: UNet2DConditionModel.from_pretrained(tmp, torch_dtype=dtype)  # noqa: E731
        theirs_fn = lambda: diffusers.UNet2DConditionModel.from_pretrained(tmp, torch_dtype=dtype)  # noqa: E731
        a, b = ours_fn().state_dict(), theirs_fn().state_dict()  # warm-up, and the same weights
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        del a, b
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(timed(ours_fn))
            theirs.append(timed(theirs_fn))
    mo, mt = statistics.median(ours), statistics.median(theirs)
    from diffusers.utils import is_accelerate_available

    mode = "meta-device load (accelerate installed)" if is_accelerate_available() else "CPU init + copy (no accelerate)"
    print(f"UNet {params / 1e6:.1f}M params, {args.dtype}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__} [{mode}], {torch.get_num_threads()} threads, {args.runs} alternated runs")
    print(f"ours      median {mo * 1000:8.1f} ms  (min {min(ours) * 1000:.1f})")
    print(f"diffusers median {mt * 1000:8.1f} ms  (min {min(theirs) * 1000:.1f})")
    print(f"ratio diffusers/ours = {mt / mo:.2f}x")


if __name__ == "__main__":
    main()
