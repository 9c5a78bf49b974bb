"""from_single_file vs from_pretrained (ours) vs diffusers' from_single_file, on the same weights.

Builds (or reuses) bench/make_checkpoint's random "sd15" folder, writes it once as an original-
layout single file with ``save_single_file``, then times, alternating after one warm-up each:
ours ``from_single_file(file)``, ours ``from_pretrained(folder)``, diffusers
``from_single_file(file, config=folder)``. Prints medians. Usage:
``python3 bench/bench_single_file.py [--model sd15|small|tiny] [--repeats 3] [--out DIR]``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("tiny", "small", "sd15"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_single_file")
    args = parser.parse_args(argv)

    import torch

    import runtime
    from bench.make_checkpoint import build_checkpoint

    out = Path(args.out)
    folder = build_checkpoint(args.model, out / args.model)
    file = out / f"{args.model}.safetensors"
    if not file.is_file():
        runtime.StableDiffusionPipeline.from_pretrained(str(folder)).save_single_file(file)
    tok = runtime.CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")

    def ours_single():
        return runtime.StableDiffusionPipeline.from_single_file(str(file), tokenizer=tok)

    def ours_folder():
        return runtime.StableDiffusionPipeline.from_pretrained(str(folder))

    def diffusers_single():
        import diffusers

        return diffusers.StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True,
                                                                  safety_checker=None)

    runs = {"ours from_single_file": ours_single, "ours from_pretrained": ours_folder,
            "diffusers from_single_file": diffusers_single}
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up: imports, page cache
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            pipe = fn()
            times[name].append(time.perf_counter() - start)
            del pipe
    size = file.stat().st_size / 2**30
    print(f"model {args.model}, file {size:.2f} GiB, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for name, values in times.items():
        print(f"{name:28s} median {statistics.median(values):7.2f} s   (runs: {', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
