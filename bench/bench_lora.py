"""LoRA adapters: what an adapter costs a UNet call, ours against diffusers + peft on the same files.

    python3 -m bench.bench_lora --model small --size 256 --reps 5
    python3 -m bench.bench_lora --model sd15 --size 512 --reps 3 --rank 8

Builds the model (bench/make_checkpoint.py) and three random rank-``--rank`` LoRA files with
diffusers + peft (attention projections, feed-forward, proj_in/out: what trainers target), then
times one UNet call (batch 2: classifier-free guidance) per configuration, configurations
alternated round by round in one process, median over rounds:

- ours and diffusers + peft: no adapter, one unfused adapter, three unfused adapters (0.5/0.3/0.2),
  one fused adapter (the second call after ``fuse_lora``; the first is its own row);
- ours at level 2 without and with one adapter;
- the swap between two adapters on the level-2 pipeline (``set_adapters``), and a hotswap load of
  a new file into the same adapter slot, with whether any base weight was repacked.

Prints a markdown table and writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def make_lora_files(folder: Path, out: Path, rank: int, count: int = 3) -> list[Path]:
    """``count`` random LoRA files for the UNet, written by diffusers from peft adapters."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    files = []
    for i in range(count):
        path = out / f"lora-{i}"
        if not (path / "pytorch_lora_weights.safetensors").exists():
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            torch.manual_seed(100 + i)
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False))
            with torch.no_grad():  # peft's random init gives large B; keep the term a realistic fraction
                for name, p in unet.named_parameters():
                    if "lora_B" in name:
                        p.mul_(0.05)
            StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=get_peft_model_state_dict(unet))
        files.append(path / "pytorch_lora_weights.safetensors")
    return files


def unet_inputs(unet, size: int, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = unet.config
    side = size // 8
    latents = torch.randn(2, cfg.in_channels, side, side, dtype=dtype)
    context = torch.randn(2, 77, cfg.cross_attention_dim, dtype=dtype)
    return latents, torch.tensor(500), context


def time_call(unet, inputs, dtype) -> float:
    latents, t, context = inputs
    with torch.inference_mode():
        start = time.perf_counter()
        unet(latents.to(dtype), t, context.to(dtype))
        return time.perf_counter() - start


def unet_dtype(unet) -> torch.dtype:
    return next(unet.parameters()).dtype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=("tiny", "small", "sd15"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5, help="rounds; each round times every configuration once")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "diffusion-runtime-bench-lora"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    import runtime
    from bench.make_checkpoint import build_checkpoint
    from bench.machine import machine_info

    work = Path(args.workdir)
    folder = build_checkpoint(args.model, work / f"{args.model}-seed0")
    files = make_lora_files(folder, work / f"{args.model}-r{args.rank}", args.rank)

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ours = runtime.StableDiffusionPipeline.from_pretrained(str(folder))
    opt = runtime.StableDiffusionPipeline.from_pretrained(str(folder))
    runtime.optimize(opt, level=2)
    inputs = unet_inputs(ours.unet, args.size)

    names = ["a", "b", "c"]
    for pipe in (theirs, ours):
        for name, f in zip(names, files):
            pipe.load_lora_weights(str(f.parent), adapter_name=name)
    opt.load_lora_weights(str(files[0].parent), adapter_name="a")
    opt.load_lora_weights(str(files[1].parent), adapter_name="b")

    def setting(pipe, which):
        """Put ``pipe`` in configuration ``which``: none, one, three or fused."""
        if getattr(pipe, "_bench_fused", False):
            pipe.unfuse_lora()
            pipe._bench_fused = False
        if which == "none":
            pipe.disable_lora()
            return
        pipe.enable_lora()
        if which == "one":
            pipe.set_adapters(["a"])
        elif which == "three":
            pipe.set_adapters(names, adapter_weights=[0.5, 0.3, 0.2])
        elif which == "fused":
            pipe.set_adapters(["a"])
            pipe.fuse_lora(components=["unet"], adapter_names=["a"])  # a fused adapter adds no term of its own
            pipe._bench_fused = True

    configs = [(f"{lib} {which}", pipe, which) for which in ("none", "one", "three", "fused")
               for lib, pipe in (("diffusers + peft", theirs), ("ours eager", ours))]
    configs += [("ours level 2 none", opt, "none"), ("ours level 2 one", opt, "one")]  # adjacent: paired ratios
    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    first_after_fuse: dict[str, list[float]] = {}
    for pipe in (theirs, ours, opt):  # warm-up: first calls pack weights, build caches
        setting(pipe, "one")
        time_call(pipe.unet, inputs, unet_dtype(pipe.unet))
    for r in range(args.reps):
        order = configs if r % 2 == 0 else configs[::-1]
        for label, pipe, which in order:
            setting(pipe, which)
            if which == "fused":  # the first call after fuse_lora is timed apart: on SD 1.5 it runs slower
                first_after_fuse.setdefault(label, []).append(time_call(pipe.unet, inputs, unet_dtype(pipe.unet)))
            times[label].append(time_call(pipe.unet, inputs, unet_dtype(pipe.unet)))
            print(f"round {r} {label}: {times[label][-1]:.3f} s", file=sys.stderr, flush=True)
    for pipe in (theirs, ours, opt):
        setting(pipe, "none")

    # swaps on the level-2 pipeline: set_adapters between two loaded adapters, and a hotswap load
    packed_before = _packed_ids(opt.unet)
    swaps = []
    opt.enable_lora()
    for r in range(max(args.reps, 3)):
        start = time.perf_counter()
        opt.set_adapters(["b" if r % 2 == 0 else "a"])
        swaps.append(time.perf_counter() - start)
    time_call(opt.unet, inputs, unet_dtype(opt.unet))
    start = time.perf_counter()
    opt.load_lora_weights(str(files[2].parent), adapter_name="a", hotswap=True)
    hotswap_s = time.perf_counter() - start
    time_call(opt.unet, inputs, unet_dtype(opt.unet))
    repacked = packed_before != _packed_ids(opt.unet)

    rows = {label: statistics.median(v) for label, v in times.items()}
    base = {"diffusers + peft": rows["diffusers + peft none"], "ours eager": rows["ours eager none"],
            "ours level 2": rows["ours level 2 none"]}
    print(f"\n{args.model}, {args.size}x{args.size}, batch 2, rank {args.rank}, median of {args.reps} rounds\n")
    print("| configuration | UNet call s | vs no adapter (same side) | paired: median of the rounds' ratios | ours / diffusers + peft |")
    print("| --- | --- | --- | --- | --- |")
    paired = {}
    for label in times:
        side = next(k for k in base if label.startswith(k))
        # each round's time over the same round's no-adapter time on that side: a machine whose speed drifts
        # between rounds moves both alike
        paired[label] = statistics.median(a / b for a, b in zip(times[label], times[f"{side} none"]))
        peer = rows.get(label.replace("ours eager", "diffusers + peft"))
        versus = f"{rows[label] / peer:.2f}x" if label.startswith("ours eager") and peer else ""
        print(f"| {label} | {rows[label]:.4f} | {rows[label] / base[side]:.3f}x | {paired[label]:.3f}x | {versus} |")
    for label, values in first_after_fuse.items():
        print(f"| {label}: the first call after fuse_lora | {statistics.median(values):.4f} | "
              f"{statistics.median(values) / base[next(k for k in base if label.startswith(k))]:.3f}x | |")
    print(f"\nlevel 2 swap (set_adapters a <-> b): median {statistics.median(swaps) * 1000:.2f} ms; "
          f"hotswap load of a new file: {hotswap_s:.3f} s; base weights repacked: {'yes' if repacked else 'no'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "machine": machine_info(), "model": args.model, "size": args.size, "rank": args.rank, "times": times,
            "medians": rows, "paired_ratios": paired, "first_after_fuse": first_after_fuse, "swap_s": swaps, "hotswap_s": hotswap_s, "repacked": repacked}, indent=2))
    return 0


def _packed_ids(unet) -> dict:
    """id of every packed or transformed base-weight copy the level-2 UNet holds (unchanged: nothing repacked)."""
    found = {}
    for name, m in unet.named_modules():
        for entry_name, impl in getattr(m, "compute", ()):
            for attr in ("packed_cache", "winograd_cache"):
                cache = getattr(impl, attr, None)
                if cache:
                    found[(name, entry_name, attr)] = tuple(sorted((str(k), id(v)) for k, v in cache.items()
                                                                   if k != "owner"))
    return found


if __name__ == "__main__":
    raise SystemExit(main())
