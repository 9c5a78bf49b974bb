"""A/B of the LoRA term's implementations at level 2: no adapter, one adapter (what runs by default: the
measured choice between our one-pass kernel and the two matmuls, and the GEGLU projection taking the term
inside its kernel), and one adapter with the two matmuls forced and GEGLU stepping aside (the path before
runtime/kernels/lora_cpu.c).

    python3 -m bench.ab_lora_term --model small --size 256 --rounds 20 --threads 2 [--target-rank 64]

One UNet call per configuration per round (batch 2), configurations alternated, order reversed every other
round; prints each one's best, its median and the median of its per-round ratios to the no-adapter call.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=("tiny", "small", "sd15"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--target-rank", type=int, default=None,
                    help="load into hotswap slots of this rank (enable_lora_hotswap), the adapter's rank padded")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "diffusion-runtime-bench-lora"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import runtime
    import runtime.optim.geglu as geglu
    from bench.bench_lora import make_lora_files, unet_inputs
    from bench.make_checkpoint import build_checkpoint
    from runtime.lora import term_kernel

    work = Path(args.workdir)
    folder = build_checkpoint(args.model, work / f"{args.model}-seed0")
    files = make_lora_files(folder, work / f"{args.model}-r{args.rank}", args.rank, count=1)
    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(folder))
    if args.target_rank:
        pipe.enable_lora_hotswap(target_rank=args.target_rank)
    runtime.optimize(pipe, level=2)
    pipe.load_lora_weights(str(files[0].parent), adapter_name="a")
    latents, t, context = unet_inputs(pipe.unet, args.size)
    dtype = next(pipe.unet.parameters()).dtype
    use_kernel, low_rank = term_kernel.use_kernel, geglu._low_rank_terms

    def setting(which: str) -> None:
        if which == "none":
            pipe.disable_lora()
            return
        pipe.enable_lora()
        forced = which == "one, two matmuls"
        term_kernel.use_kernel = (lambda *a: False) if forced else use_kernel
        geglu._low_rank_terms = (lambda *a: None) if forced else low_rank

    def call() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            pipe.unet(latents.to(dtype), t, context.to(dtype))
            return time.perf_counter() - start

    configs = ["none", "one", "one, two matmuls"]
    for which in configs:
        setting(which)
        call()
        call()
    times = {c: [] for c in configs}
    try:
        for r in range(args.rounds):
            for which in configs if r % 2 == 0 else configs[::-1]:
                setting(which)
                call()
                times[which].append(call())
    finally:
        term_kernel.use_kernel, geglu._low_rank_terms = use_kernel, low_rank
    slots = f", in rank-{args.target_rank} hotswap slots" if args.target_rank else ""
    print(f"\n{args.model}, {args.size}x{args.size}, level 2, rank {args.rank}{slots}, {args.rounds} rounds\n")
    print("| configuration | best s | median s | paired median vs no adapter |")
    print("| --- | --- | --- | --- |")
    for which in configs:
        ratio = statistics.median(a / b for a, b in zip(times[which], times["none"]))
        print(f"| {which} | {min(times[which]):.4f} | {statistics.median(times[which]):.4f} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
