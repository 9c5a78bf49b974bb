"""The ``diffusion-runtime`` command: ``generate`` an image from a checkpoint, or ``info`` on one.

User mistakes (a missing folder, a bad size, an unknown scheduler) print one line to stderr and
exit with status 2; only real bugs show a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

from runtime.models.errors import InputError, RuntimeErrorBase

EXIT_USER_ERROR = 2


SHIPPED_MODEL = Path(__file__).resolve().parent / "assets" / "shapes"


def default_model() -> str | None:
    """The model used when none is named: the shapes model the package ships (train/train_shapes.py)."""
    return str(SHIPPED_MODEL) if (SHIPPED_MODEL / "model_index.json").is_file() else None


def scheduler_class(name: str):
    """A key of SCHEDULER_CLASSES; case-insensitive, the ``Scheduler`` suffix optional."""
    from runtime.schedulers import SCHEDULER_CLASSES

    wanted = name.lower().removesuffix("scheduler")
    for key, cls in SCHEDULER_CLASSES.items():
        if key.lower().removesuffix("scheduler") == wanted:
            return cls
    raise InputError(f"unknown scheduler {name!r}; choose one of: {', '.join(sorted(SCHEDULER_CLASSES))}")


def _resolve_model(model: str | None) -> str:
    model = model or default_model()
    if model is None:
        raise InputError("no model given and no default model is installed: pass a checkpoint folder or hub id")
    return model


def _timed_text_encoders(pipe, timings: dict):
    """Forward hooks adding each text encoder's time to timings['text encode']; returns the handles."""
    handles = []
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a: timings.__setitem__("_start", time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o: timings.__setitem__("text encode", timings.get("text encode", 0.0)
                                                + time.perf_counter() - timings["_start"])))
    return handles


def generate(args: argparse.Namespace) -> int:
    import torch

    from runtime.image_io import postprocess
    from runtime.pipelines import DiffusionPipeline
    from runtime.pipelines.vae_codec import decode_latents

    output = Path(args.output)
    if not output.parent.is_dir():
        raise InputError(f"--output: folder {output.parent} does not exist")
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise InputError(f"--output: unsupported image extension {output.suffix!r}; use .png, .jpg or .webp")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    scheduler_cls = scheduler_class(args.scheduler) if args.scheduler else None
    model = _resolve_model(args.model)

    timings: dict = {}
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    if args.device:
        pipe.to(args.device)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=args.quiet)
    timings["load"] = time.perf_counter() - start
    if args.level:
        from runtime import optimize

        start = time.perf_counter()
        optimize(pipe, level=args.level)
        timings["optimize"] = time.perf_counter() - start
        print(pipe.optimization)

    handles = _timed_text_encoders(pipe, timings)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    start = time.perf_counter()
    try:
        latents = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, height=args.height, width=args.width,
                       generator=generator, output_type="latent").images
    finally:
        for h in handles:
            h.remove()
    timings["denoise"] = time.perf_counter() - start - timings.get("text encode", 0.0)

    start = time.perf_counter()
    image = postprocess(decode_latents(pipe, pipe.vae, latents, where="generate"), "pil")[0]
    timings["decode"] = time.perf_counter() - start
    image.save(output)
    print(f"wrote {output} ({image.width}x{image.height}, seed {args.seed}, {args.steps} steps, "
          f"{type(pipe.scheduler).__name__})")
    for stage in ("load", "optimize", "text encode", "denoise", "decode"):
        if stage == "optimize" and stage not in timings:
            continue
        print(f"  {stage:<12} {timings.get(stage, 0.0):8.3f} s")
    return 0


def compare(args: argparse.Namespace) -> int:
    """The same prompt at each of --levels: a strip of images and a table of time and adherence."""
    import torch

    from runtime.compare_levels import compare_levels, format_table, strip
    from runtime.pipelines import DiffusionPipeline

    output = Path(args.output)
    if not output.parent.is_dir():
        raise InputError(f"--output: folder {output.parent} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _resolve_model(args.model)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    print(f"{model}: {args.prompt!r}, {args.steps} steps, guidance {args.guidance}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads; each level runs the prompt twice (the first call compiles at 2+)")
    results = compare_levels(pipe, args.prompt, args.levels, steps=args.steps, guidance=args.guidance,
                             seed=args.seed, negative_prompt=args.negative_prompt)
    strip(results).save(output)
    print(format_table(results))
    print(f"wrote {output} (levels {' '.join(map(str, args.levels))}, left to right)")
    return 0


def _safetensors_summary(folder: Path) -> tuple[int, dict[str, int]]:
    """(parameter count, {dtype: count}) from safetensors headers, without loading any tensor."""
    total, by_dtype = 0, {}
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1) or sorted(folder.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
            by_dtype[entry["dtype"]] = by_dtype.get(entry["dtype"], 0) + count
    return total, by_dtype


def info(args: argparse.Namespace) -> int:
    from runtime.models.config import read_json
    from runtime.models.hub import resolve_folder

    from runtime.pipelines import PIPELINE_CLASSES
    from runtime.pipelines.registry import UNSUPPORTED_OPTIONAL, model_class

    # configs only: a hub id is not downloaded in full; sizes show where weights are already local
    root = resolve_folder(_resolve_model(args.model), allow_patterns=["*.json", "*.txt"])
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else None
    if index is None:
        raise InputError(f"{root}: no model_index.json, so this is not a diffusers pipeline folder")
    name = index.get("_class_name")
    supported = "supported" if name in PIPELINE_CLASSES else "not supported"
    print(f"{root}: {name} ({supported}), written by diffusers {index.get('_diffusers_version', '?')}")
    for key, entry in sorted(index.items()):
        if key.startswith("_"):
            continue
        if not (isinstance(entry, list) and len(entry) == 2):
            print(f"  {key} = {entry!r}")
            continue
        library, cls = entry
        if cls is None:
            print(f"  {key:<18} -")
            continue
        ours = "ours" if model_class(cls) is not None else UNSUPPORTED_OPTIONAL.get(cls, "not implemented")
        line = f"  {key:<18} {library}.{cls} [{ours}]"
        total, by_dtype = _safetensors_summary(root / key)
        if total:
            dtypes = ", ".join(f"{d} {n:,}" for d, n in sorted(by_dtype.items()))
            line += f"  {total:,} parameters ({dtypes})"
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image from a prompt")
    gen.add_argument("model", nargs="?", help="checkpoint folder (diffusers layout) or hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--scheduler", default=None, help="a scheduler class name, e.g. EulerDiscreteScheduler")
    gen.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    gen.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    gen.add_argument("--output", "-o", default="output.png")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--level", type=int, choices=(0, 1, 2, 3), default=0,
                     help="runtime.optimize level (0: eager; compile at 2+ makes the first call slow)")
    gen.set_defaults(run=generate)

    cmp = sub.add_parser("compare", help="one prompt at several optimization levels, side by side")
    cmp.add_argument("model", nargs="?", help="checkpoint folder or hub id (default: the shipped model)")
    cmp.add_argument("--prompt", required=True)
    cmp.add_argument("--negative-prompt", default=None)
    cmp.add_argument("--levels", type=int, nargs="+", choices=(0, 1, 2, 3), default=[0, 1, 2, 3])
    cmp.add_argument("--steps", type=int, default=20)
    cmp.add_argument("--guidance", type=float, default=7.5)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    cmp.add_argument("--output", "-o", default="levels.png")
    cmp.set_defaults(run=compare)

    inf = sub.add_parser("info", help="what a checkpoint folder holds")
    inf.add_argument("model", nargs="?", help="checkpoint folder or hub id")
    inf.set_defaults(run=info)

    sub.add_parser("bench", help="how to run the benchmark suite (it lives in the repository, not the package)",
                   add_help=False)
    return parser


BENCH_HELP = (
    "diffusion-runtime: the benchmark suite is not installed with the package; it runs from a checkout\n"
    "of the repository, beside diffusers: `python -m bench --help` in the repository's root\n"
    "(`python -m bench --quick --out results/quick` for a smoke run).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the suite is not part of the installed package (it imports diffusers)
        print(BENCH_HELP, file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RuntimeErrorBase, FileNotFoundError, NotADirectoryError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"diffusion-runtime {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
