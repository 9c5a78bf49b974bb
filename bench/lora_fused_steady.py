"""Fused LoRA in steady state: UNet calls with no adapter, one unfused, fused (three calls each), over
two fuse / unfuse cycles, in a process that holds one pipeline. bench_lora.py alternates
configurations across three pipelines and times one or two calls after each change; this shows what a
fused adapter costs once its first calls are past.

    python3 -m bench.lora_fused_steady --folder /tmp/ckpt/sd15-seed0 --lora /tmp/ckpt/sd15-r8/lora-0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True, help="a checkpoint folder (bench/make_checkpoint.py)")
    ap.add_argument("--lora", required=True, help="a LoRA folder written by bench_lora.py")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import runtime
    from bench.bench_lora import time_call, unet_inputs

    pipe = runtime.StableDiffusionPipeline.from_pretrained(args.folder)
    pipe.load_lora_weights(args.lora, adapter_name="a")
    inputs = unet_inputs(pipe.unet, args.size)

    def calls(label: str, n: int = 3) -> None:
        times = [time_call(pipe.unet, inputs, torch.float32) for _ in range(n)]
        print(f"| {label} | {' / '.join(f'{t:.3f}' for t in times)} |", flush=True)

    print("| configuration | UNet call s (three calls in a row) |\n| --- | --- |")
    pipe.disable_lora()
    calls("no adapter")
    for cycle in (1, 2):
        pipe.enable_lora()
        pipe.set_adapters(["a"])
        calls(f"cycle {cycle}: one unfused adapter")
        pipe.fuse_lora(components=["unet"], adapter_names=["a"])
        calls(f"cycle {cycle}: fused")
        pipe.unfuse_lora()
        pipe.disable_lora()
        calls(f"cycle {cycle}: no adapter, after unfuse_lora")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
