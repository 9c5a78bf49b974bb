"""Where one UNet step's time goes, per operator family, eager and at a level's precision.

    python3 bench/profile_step.py --model small --size 256 --dtype bfloat16 [--level 1]

Runs torch.profiler over a few warm UNet calls of our model (batch 2, as with guidance) and prints,
per family (convolution, linear/matmul, attention, normalisation, elementwise, copies/casts, other),
the share of CPU time, beside each family's FLOP rate where it does FLOPs. What the profile says is
where an optimization can still win on this machine (issue 4's notes in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = (  # first match wins: (family, substrings of the aten op name)
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "bmm", "baddbmm",
                   "cpu_attention")),
    ("convolution", ("convolution", "conv2d", "mkldnn_convolution", "_convolution", "_convolution_pointwise",
                     "winograd")),
    ("linear/matmul", ("linear", "addmm", "mm", "matmul", "_linear_pointwise")),
    ("normalisation", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("copies/casts", ("copy_", "to", "_to_copy", "contiguous", "clone", "cat", "permute", "transpose", "view",
                      "reshape", "empty", "as_strided")),
    ("elementwise", ("add", "mul", "silu", "gelu", "geglu", "sigmoid", "div", "sub", "upsample", "pad", "exp", "sin", "cos")),
)


# Operators counted: aten's, oneDNN's (packed convolutions) and our kernels' (a record_function each).
PREFIXES = ("aten::", "mkldnn::", "diffusion_runtime::")


def family(op: str) -> str:
    name = op.split("::", 1)[-1]
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="tiny | small | sd15 | a checkpoint folder")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--level", type=int, default=None, help="optimize the pipeline at this level first")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--top", type=int, default=15, help="also list the N costliest operators")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import runtime
    from bench.cli import resolve_model

    folder, side, why_not = resolve_model(args.model, str(Path.home() / ".cache" / "diffusion-runtime" /
                                                          "bench-checkpoints"), 0)
    if folder is None:
        raise SystemExit(f"profile_step: {why_not}")
    side = args.size or side
    pipe = runtime.StableDiffusionPipeline.from_pretrained(folder)
    if args.level is not None:
        runtime.optimize(pipe, level=args.level, compile=False)
    dtype = getattr(torch, args.dtype)
    unet = pipe.unet.to(dtype)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x = torch.randn(2, unet.config.in_channels, side // factor, side // factor, dtype=dtype)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype)
    t = torch.tensor(500)
    with torch.inference_mode():
        unet(x, t, ctx)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
            for _ in range(args.calls):
                unet(x, t, ctx)
    events = [e for e in prof.key_averages() if e.key.startswith(PREFIXES)]
    # self time avoids double counting nested aten calls
    total = sum(e.self_cpu_time_total for e in events)
    by_family: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in events:
        fam = family(e.key)
        by_family[fam][0] += e.self_cpu_time_total
        by_family[fam][1] += e.flops or 0
    print(f"{args.model} {side}x{side} {args.dtype}, level {args.level}, {torch.get_num_threads()} threads: "
          f"{total / args.calls / 1e6:.4f} s per UNet call (profiled self time)")
    print(f"{'family':<16}{'share':>8}{'s/call':>10}{'GFLOP/s':>10}")
    for fam, (us, flops) in sorted(by_family.items(), key=lambda kv: -kv[1][0]):
        rate = f"{flops / us / 1e3:.0f}" if flops and us else "-"
        print(f"{fam:<16}{us / total:>8.1%}{us / args.calls / 1e6:>10.4f}{rate:>10}")
    print(f"\ncostliest {args.top} operators (self time):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        rate = f"{e.flops / e.self_cpu_time_total / 1e3:.0f} GFLOP/s" if e.flops else ""
        print(f"  {e.key:<40}{e.self_cpu_time_total / total:>7.1%}  x{e.count // args.calls:<4} {rate}")


if __name__ == "__main__":
    main()
