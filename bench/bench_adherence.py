"""Prompt adherence and parity of every optimization level and pass, on the shipped shapes model.

For each of our configurations (eager, levels 1-3, each pass alone: the same list as the pipeline
benchmark) it generates the held-out prompts (attribute combinations training never saw) with one
seed per prompt, reads every image back with the shapes scorer, and reports per-attribute adherence,
PSNR of each image against the eager image of the same prompt and seed, and seconds per image
(steady state: one untimed warm-up call per configuration first, so compile time is reported apart).

    python3 bench/bench_adherence.py --out results/adherence [--prompts 48] [--steps 20] [--no-compile]

Writes rows.jsonl (one row per configuration) and table.md in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

ATTRIBUTES = ("shape", "colour", "background", "position", "size", "overall")


def _generate(pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int) -> list[np.ndarray]:
    import torch

    from runtime.image_io import to_uint8

    images = []
    for i in range(0, len(prompts), batch):
        gen = [torch.Generator().manual_seed(seed + i + j) for j in range(len(prompts[i:i + batch]))]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                   output_type="np")
        images.extend(to_uint8(out.images))
    return images


def run_config(pipe, spec, prompts, reference, args) -> tuple[dict, list[np.ndarray]]:
    """Apply one configuration, warm up, generate, score; the pipeline is eager again afterwards."""
    from runtime.optim.parity import psnr
    from runtime import optimize
    from runtime.shapes import adherence

    row = {"config": spec.name, "level": spec.settings.get("level", 0),
           "overrides": spec.settings.get("overrides", {})}
    start = time.perf_counter()
    if spec.kind in ("level", "pass"):
        optimize(pipe, level=spec.settings["level"], **spec.settings.get("overrides", {}))
        row["optimization"] = pipe.optimization.as_dict()
    try:
        _generate(pipe, prompts[: args.batch], args.steps, args.guidance, args.seed, args.batch)  # warm-up
        row["setup_and_warmup_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        images = _generate(pipe, prompts, args.steps, args.guidance, args.seed, args.batch)
        row["s_per_image"] = round((time.perf_counter() - start) / len(prompts), 4)
    finally:
        if getattr(pipe, "optimization", None) is not None:
            pipe.optimization.revert()
    row["adherence"] = {k: round(v, 4) for k, v in adherence(images, prompts).items()}
    if reference is not None:
        values = [psnr(a, b) for a, b in zip(images, reference)]
        finite = [v for v in values if not math.isinf(v)]
        row["psnr_db_mean"] = round(float(np.mean(finite)), 2) if finite else math.inf
        row["psnr_db_min"] = round(float(min(finite)), 2) if finite else math.inf
        row["identical_images"] = len(values) - len(finite)
    return row, images


def custom_spec(text: str):
    """``NAME=LEVEL:JSON`` -> a configuration of our pipeline at LEVEL with the JSON overrides."""
    from bench.configs import ConfigSpec

    name, sep, rest = text.partition("=")
    level, sep2, overrides = rest.partition(":")
    try:
        if not (sep and sep2 and name):
            raise ValueError("expected NAME=LEVEL:JSON")
        settings = {"level": int(level), "overrides": json.loads(overrides)}
        if not isinstance(settings["overrides"], dict):
            raise ValueError("the JSON must be an object of pass overrides")
    except ValueError as exc:
        raise SystemExit(f"bench_adherence: bad --custom {text!r}: {exc}") from None
    return ConfigSpec(name, "ours", "level", settings)


def table(rows: list[dict]) -> str:
    eager = rows[0]["s_per_image"]
    head = "| config | s/image | vs eager | PSNR mean (min) dB | " + " | ".join(ATTRIBUTES) + " |"
    lines = [head, "|" + " --- |" * (4 + len(ATTRIBUTES))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | skipped: {r['error']} |" + " |" * (2 + len(ATTRIBUTES)))
            continue
        if "psnr_db_mean" not in r:
            db = "reference"
        elif math.isinf(r["psnr_db_mean"]):
            db = "identical"
        else:
            db = f"{r['psnr_db_mean']:.1f} ({r['psnr_db_min']:.1f})"
        cells = " | ".join(f"{r['adherence'][k]:.2f}" for k in ATTRIBUTES)
        lines.append(f"| {r['config']} | {r['s_per_image']:.3f} | {eager / r['s_per_image']:.2f}x | {db} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="leave out configurations that compile")
    p.add_argument("--configs", nargs="*", help="only these configuration names (eager is always run)")
    p.add_argument("--custom", nargs="*", default=[], metavar="NAME=LEVEL:JSON",
                   help='extra configurations, e.g. dc2=0:{"deepcache": {"interval": 2}} (settings sweeps)')
    args = p.parse_args(argv)

    import torch

    from bench.configs import OURS_EAGER, all_specs
    from runtime import StableDiffusionPipeline
    from runtime.cli import default_model
    from runtime.shapes import held_out_prompts

    torch.set_num_threads(args.threads)
    model = args.model or default_model()
    if model is None:
        raise SystemExit("bench_adherence: no --model and no shipped model installed")
    specs = [s for s in all_specs(no_compile=args.no_compile) if s.impl == "ours"]
    if args.no_compile:
        specs = [s for s in specs if not s.compiles]
    if args.configs is not None:
        specs = [s for s in specs if s.name == OURS_EAGER or s.name in args.configs]
    specs += [custom_spec(text) for text in args.custom]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = held_out_prompts(args.prompts, seed=args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    rows, reference = [], None
    with open(out / "rows.jsonl", "w") as f:
        for spec in specs:
            print(f"{spec.name} ...", flush=True)
            try:
                row, images = run_config(pipe, spec, prompts, reference, args)
            except Exception as exc:  # a configuration that cannot run here is reported, not fatal
                row, images = {"config": spec.name, "error": str(exc).splitlines()[0][:200]}, None
            if reference is None and images is not None:
                reference = images
            row.update(model=str(model), prompts=len(prompts), steps=args.steps, guidance=args.guidance,
                       threads=args.threads)
            rows.append(row)
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            print(f"  {json.dumps({k: row.get(k) for k in ('s_per_image', 'psnr_db_mean', 'adherence', 'error')})}",
                  flush=True)
    text = table(rows)
    (out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
