"""The empty compute slot's cost: runtime.models.layers.Conv2d / Linear with nothing plugged against
torch's nn.Conv2d / nn.Linear on the same weights, alternated in one process, medians.

``python3 -m bench.bench_layer_slots [--reps 200] [--threads 2]``

Tiny shapes show the per-call Python overhead (what the slot could add); the UNet shapes show it
against real work. Prints one markdown table; figures go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from runtime.models.layers import Conv2d, Linear

CASES = [  # (label, make torch layer, make ours, input shape)
    ("conv 8->8 3x3 on 1x8x8x8 (overhead)", lambda: nn.Conv2d(8, 8, 3, padding=1), lambda: Conv2d(8, 8, 3, padding=1),
     (1, 8, 8, 8)),
    ("conv 320->320 3x3 on 2x320x32x32", lambda: nn.Conv2d(320, 320, 3, padding=1),
     lambda: Conv2d(320, 320, 3, padding=1), (2, 320, 32, 32)),
    ("linear 8->8 on 1x8 (overhead)", lambda: nn.Linear(8, 8), lambda: Linear(8, 8), (1, 8)),
    ("linear 320->1280 on 2x1024x320", lambda: nn.Linear(320, 1280), lambda: Linear(320, 1280), (2, 1024, 320)),
]


def timed(fn, x, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - start) / inner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200, help="alternated repetitions per case")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| case | torch median | empty slot median | ratio |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for label, make_torch, make_ours, shape in CASES:
            ref = make_torch()
            ours = make_ours()
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(*shape)
            assert torch.equal(ref(x), ours(x))
            small = x.numel() < 10_000
            inner = 200 if small else 1
            reps = args.reps if small else max(10, args.reps // 10)
            a, b = [], []
            for i in range(reps):  # alternate which goes first
                pair = [(ref, a), (ours, b)] if i % 2 == 0 else [(ours, b), (ref, a)]
                for layer, times in pair:
                    times.append(timed(layer, x, inner))
            ma, mb = statistics.median(a), statistics.median(b)
            unit, scale = ("us", 1e6)
            print(f"| {label} | {ma * scale:.2f} {unit} | {mb * scale:.2f} {unit} | {mb / ma:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
