"""One configuration in a fresh process: first-call and warm-call seconds, and honest peak RSS.

The parent runs this twice per compiling configuration: once with an empty inductor cache (cold
compile) and once over the cache the first run filled (warm compile: a second process). Peak RSS
is the child's ``ru_maxrss``: one configuration per process, so nothing of another leaks in.
Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _import_implementation(spec) -> None:
    """Import (and resolve the lazy attributes of) what the configuration uses, before the load clock starts."""
    if spec.impl == "diffusers":
        import diffusers

        _ = diffusers.StableDiffusionPipeline, diffusers.UNet2DConditionModel
        if spec.kind == "deepcache":
            import DeepCache  # noqa: F401
        if spec.kind == "tomesd":
            import tomesd  # noqa: F401
    elif spec.impl == "openvino":
        import openvino  # noqa: F401
        from optimum.intel import OVStableDiffusionPipeline  # noqa: F401
    else:
        from runtime import optim  # noqa: F401
        import runtime

        _ = runtime.StableDiffusionPipeline, runtime.UNet2DConditionModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.probe")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--spec", required=True, help="ConfigSpec as JSON")
    parser.add_argument("--call", required=True, help="pipeline call arguments as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)

    import torch

    from .configs import ConfigSpec, Loader
    from .machine import peak_rss_mib
    from .timing import generate, initial_latents

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ConfigSpec(**json.loads(args.spec))
    call = json.loads(args.call)
    import_start = time.perf_counter()
    _import_implementation(spec)  # imports are not load time: a server pays them once
    import_s = time.perf_counter() - import_start
    start = time.perf_counter()
    prepared = Loader(args.folder, compile_cache=args.cache_dir, size=(call["height"], call["width"])).prepare(spec)
    load_s = time.perf_counter() - start
    latents = initial_latents(prepared.pipe, 1, call["height"], call["width"], args.seed)
    times = []
    for _ in range(2):
        prepared.enter()
        try:
            times.append(generate(prepared.pipe, call, latents)[1])
        finally:
            prepared.exit()
    print(json.dumps({"import_s": import_s, "load_and_setup_s": load_s, "first_call_s": times[0], "second_call_s": times[1],
                      "peak_rss_mib": peak_rss_mib()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
