"""Where an image's time goes at each level: text encoding, the denoising loop and the VAE decode.

    python3 -m bench.bench_stages --model small --size 256 --steps 10 --calls 3 --threads 2

Per level (0 = eager): load the checkpoint, optimize, one warm-up image, then ``--calls`` images timed by
stage (median per stage): the text encoders by forward hooks, the loop as the call with
``output_type="latent"`` minus the encoders, the decode as ``decode_latents`` after it (what the
``generate`` command times). Diffusers eager fp32 on the same weights is the first row. Prints a markdown
table with each stage's speed-up over diffusers.
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

PROMPT = "a red circle on a blue background"
STAGES = ("text encode", "denoise", "decode")


def stage_times(pipe, decode, size: int, steps: int) -> dict:
    """One image's seconds per stage; ``decode(latents)`` turns the loop's latents into pixels."""
    timings: dict = {}
    from runtime.cli import _timed_text_encoders  # the generate command's own stage hooks

    handles = _timed_text_encoders(pipe, timings)
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            latents = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, output_type="latent",
                           generator=torch.Generator().manual_seed(0)).images
            timings["denoise"] = time.perf_counter() - start - timings.get("text encode", 0.0)
            start = time.perf_counter()
            decode(latents)
            timings["decode"] = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return {k: timings.get(k, 0.0) for k in STAGES}


def measured(pipe, decode, size: int, steps: int, calls: int) -> dict:
    stage_times(pipe, decode, size, steps)  # warm-up
    runs = [stage_times(pipe, decode, size, steps) for _ in range(calls)]
    return {k: statistics.median(r[k] for r in runs) for k in STAGES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=("tiny", "small", "sd15"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "diffusion-runtime-bench-stages"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    import runtime
    from bench.make_checkpoint import build_checkpoint
    from runtime.pipelines.vae_codec import decode_latents

    folder = build_checkpoint(args.model, Path(args.workdir) / f"{args.model}-seed0")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    rows = [("diffusers eager fp32", measured(
        ref, lambda z: ref.vae.decode(z / ref.vae.config.scaling_factor).sample, args.size, args.steps, args.calls))]
    del ref
    for level in [int(v) for v in args.levels.split(",")]:
        pipe = runtime.StableDiffusionPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        if level:
            runtime.optimize(pipe, level=level)
        rows.append((f"ours level {level}", measured(
            pipe, lambda z, p=pipe: decode_latents(p, p.vae, z, where="bench"), args.size, args.steps, args.calls)))
        del pipe
    base = rows[0][1]
    print(f"\n{args.model}, {args.size}x{args.size}, {args.steps} steps, median of {args.calls} images, "
          f"{torch.get_num_threads()} threads\n")
    print("| configuration | text encode s | denoise s | decode s | total s | decode vs diffusers | total vs diffusers |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, t in rows:
        total = sum(t.values())
        print(f"| {label} | {t['text encode']:.3f} | {t['denoise']:.3f} | {t['decode']:.3f} | {total:.3f} | "
              f"{base['decode'] / t['decode']:.2f}x | {sum(base.values()) / total:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
