"""``python3 -m bench`` (from a checkout): the whole-pipeline comparison, written to a results folder.

    python3 -m bench --quick --out results/quick            # tiny model, a minute or two
    python3 -m bench --model small --out results/small       # the full comparison (tens of minutes)
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

QUICK = dict(steps=3, warmup=1, runs=2, matmul_runs=2)
FULL = dict(steps=10, warmup=1, runs=5, matmul_runs=5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-runtime bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results", help="results folder (rows.jsonl, table.md, plot.png)")
    p.add_argument("--model", default=None,
                   help="tiny | small | sd15 (random weights, built seeded on first use) | shipped | a checkpoint folder")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 3 steps, 1 warm-up + 2 runs, 4 configs")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--runs", type=int, default=None, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--configs", default=None, help="comma-separated configuration names (baselines always run)")
    p.add_argument("--list", action="store_true", help="print the configuration names and exit")
    p.add_argument("--no-compile", action="store_true", help="drop configurations that torch.compile")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the per-configuration fresh processes (peak RSS, compile cold/warm)")
    p.add_argument("--checkpoints", default=str(Path.home() / ".cache" / "diffusion-runtime" / "bench-checkpoints"),
                   help="where the random-weight models are built and kept")
    return p


def resolve_model(name: str, checkpoints: str, seed: int) -> tuple[str | None, int | None, str | None]:
    """(checkpoint folder, default image side, reason it cannot run)."""
    from .make_checkpoint import DEFAULT_SIZE, MODELS, CheckpointSkipped, build_checkpoint

    if name in MODELS:
        try:
            folder = build_checkpoint(name, Path(checkpoints) / f"{name}-seed{seed}", seed)
        except CheckpointSkipped as exc:
            return None, DEFAULT_SIZE[name], str(exc)
        return str(folder), DEFAULT_SIZE[name], None
    if name == "shipped":
        try:
            from runtime.cli import default_model
        except ImportError as exc:
            return None, 64, f"runtime.cli is not importable: {exc}"
        folder = default_model()
        if folder is None:
            return None, 64, "the shipped model (issue 6) is not installed yet"
        return str(folder), None, None
    if not Path(name).is_dir():
        raise SystemExit(f"bench: --model {name!r} is neither tiny/small/sd15/shipped nor a checkpoint folder")
    return name, None, None


def _default_side(folder: str) -> int:
    import json

    unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    return int(unet.get("sample_size", 64)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .configs import all_specs, quick_specs, select

    specs = quick_specs() if args.quick else all_specs(no_compile=args.no_compile)
    if args.list:
        print("\n".join(s.name for s in specs))
        return 0
    specs = select(specs, args.configs.split(",") if args.configs else None, args.no_compile)
    if args.no_compile:
        specs = [s for s in specs if not s.compiles]
    defaults = QUICK if args.quick else FULL
    model = args.model or ("tiny" if args.quick else "small")
    folder, side, why_not = resolve_model(model, args.checkpoints, args.seed)
    if folder is not None and side is None:
        side = _default_side(folder)
    side = args.size or side

    from .machine import git_commit, machine_info
    from .pipeline_bench import BenchSettings, run_benchmark
    from .report import write_results

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-work-")
    settings = BenchSettings(
        folder=folder or "", model=model, height=side, width=side,
        steps=args.steps or defaults["steps"], guidance_scale=args.guidance_scale, prompt=args.prompt, seed=args.seed,
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        runs=args.runs or defaults["runs"], threads=args.threads, probe=not args.no_probe,
        score=model == "shipped", matmul_runs=defaults["matmul_runs"], work_dir=work)
    start = time.perf_counter()
    try:
        if why_not is None:
            rows = run_benchmark(settings, specs)
        else:
            print(f"bench: skipped: {why_not}", file=sys.stderr)
            rows = [_skipped_row(s, settings, why_not) for s in specs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = {"commit": git_commit(), "machine": machine_info(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python3 -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "wall_s": round(time.perf_counter() - start, 1)}
    paths = write_results(rows, header, Path(args.out))
    print(paths["table"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def _skipped_row(spec, settings, reason: str) -> dict:
    from dataclasses import asdict

    return {"config": spec.name, "status": "skipped", "reason": reason, "figures": {}, "parity": {},
            "impl": spec.impl, "kind": spec.kind, "compiles": spec.compiles, "matmul_peaks": None,
            "settings": {**spec.settings, **{k: v for k, v in asdict(settings).items() if k != "work_dir"}}}


if __name__ == "__main__":
    sys.exit(main())
