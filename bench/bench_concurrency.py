"""Concurrency stress: one level-0 and one level-3 pipeline, their from_pipe siblings (img2img,
inpaint) sharing the same components, N threads x M requests mixing schedulers, sizes, guidance
scales, num_images_per_prompt, callbacks and, with ``--lora``, a LoRA adapter on both pipelines at a
per-request call-time scale (``cross_attention_kwargs={"scale": s}``, 0 to 1, or none given). Every image must equal its sequential twin
(torch.equal, one intra-op thread). Reports throughput and p50 / p99 latency, concurrent against
the same requests in sequence.

    python3 bench/bench_concurrency.py                       # 8 threads x 25 requests, shipped model
    python3 bench/bench_concurrency.py --threads 8 --requests 3 --model path/to/folder --out results/conc

tests/reliability/test_reliability_concurrency.py runs a bounded version (8 x 3) on the tiny test model.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import runtime  # noqa: E402

SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
TASKS = ("text2image", "img2img", "inpaint")
PROMPTS = ("a large red circle on a blue background, in the centre", "a small yellow triangle on a black background",
           "a green square on a white background, on the left", "")


@dataclass(frozen=True)
class Request:
    index: int
    level: int
    task: str
    scheduler: str
    size: int
    guidance_scale: float
    num_images_per_prompt: int
    callback: bool
    seed: int
    prompt: str
    steps: int
    lora_scale: float | None = None  # cross_attention_kwargs={"scale": ...}; None: not passed


@dataclass
class Result:
    images: torch.Tensor
    steps_seen: list = field(default_factory=list)
    seconds: float = 0.0


def random_lora(pipe, rank: int = 4, seed: int = 0) -> dict:
    """A PEFT-format LoRA state dict for ``pipe``: every attention projection of the UNet and q/v of the
    text encoder, seeded random weights of a size that changes the image."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, model, ends in (("unet", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                ("text_encoder", pipe.text_encoder, ("q_proj", "v_proj"))):
        for name, m in model.named_modules():
            if name.endswith(ends) and isinstance(m, torch.nn.Linear):
                out[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.3
                out[f"{prefix}.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.3
    return out


def build_pipes(folder: str | Path, levels=(0, 3), lora: bool = False) -> dict:
    """{(level, task, scheduler): pipeline}; per level one loaded pipeline (with ``lora``, a random
    adapter loaded into it before it is optimized), everything else from_pipe."""
    pipes = {}
    for level in levels:
        base = runtime.StableDiffusionPipeline.from_pretrained(folder)
        base.set_progress_bar_config(disable=True)
        if lora:
            base.load_lora_weights(random_lora(base), adapter_name="stress")
        if level:
            runtime.optimize(base, level=level)
        classes = {"text2image": runtime.StableDiffusionPipeline, "img2img": runtime.StableDiffusionImg2ImgPipeline,
                   "inpaint": runtime.StableDiffusionInpaintPipeline}
        for name in SCHEDULERS:
            scheduler = getattr(runtime, name).from_config(base.scheduler.config)
            for task, cls in classes.items():
                pipes[(level, task, name)] = cls.from_pipe(base, scheduler=scheduler)
    return pipes


def make_requests(count: int, sizes=(16, 24), seed: int = 0, steps=(3, 4), levels=(0, 3),
                  lora: bool = False) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        req = Request(index=i, level=rng.choice(levels), task=rng.choice(TASKS), scheduler=rng.choice(SCHEDULERS),
                      size=rng.choice(sizes), guidance_scale=rng.choice([1.0, 4.5, 7.5]),
                      num_images_per_prompt=rng.choice([1, 1, 2]), callback=rng.random() < 0.5,
                      seed=rng.randrange(2**31), prompt=rng.choice(PROMPTS), steps=rng.choice(steps))
        if lora:
            req = replace(req, lora_scale=rng.choice([None, 0.0, 0.5, 1.0]))
        out.append(req)
    return out


def _image(size: int, seed: int):
    from PIL import Image

    g = np.random.default_rng(seed)
    img = Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return img, Image.fromarray(mask)


def run_one(pipes: dict, req: Request) -> Result:
    pipe = pipes[(req.level, req.task, req.scheduler)]
    seen: list = []

    def callback(p, i, t, tensors):
        seen.append((i, float(t), float(tensors["latents"].float().abs().sum())))
        return {}

    kwargs = dict(prompt=req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                  num_images_per_prompt=req.num_images_per_prompt, output_type="pt",
                  generator=torch.Generator().manual_seed(req.seed),
                  callback_on_step_end=callback if req.callback else None)
    if req.lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": req.lora_scale}
    if req.task == "text2image":
        kwargs.update(height=req.size, width=req.size)
    else:
        image, mask = _image(req.size, req.seed)
        kwargs.update(image=image, strength=0.75)
        if req.task == "inpaint":
            kwargs.update(mask_image=mask, height=req.size, width=req.size)
    start = time.perf_counter()
    images = pipe(**kwargs).images
    return Result(images=images, steps_seen=seen, seconds=time.perf_counter() - start)


def run_sequential(pipes: dict, requests: list[Request]) -> list[Result]:
    return [run_one(pipes, r) for r in requests]


def run_concurrent(pipes: dict, requests: list[Request], threads: int) -> list[Result]:
    barrier = threading.Barrier(threads)

    def work(chunk):
        barrier.wait()  # every thread starts together, so calls really overlap
        return [(r.index, run_one(pipes, r)) for r in chunk]

    chunks = [requests[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        done = [item for part in pool.map(work, chunks) for item in part]
    return [res for _, res in sorted(done, key=lambda x: x[0])]


def mismatches(requests, sequential, concurrent) -> list[str]:
    bad = []
    for req, a, b in zip(requests, sequential, concurrent):
        if not torch.equal(a.images, b.images) or a.steps_seen != b.steps_seen:
            bad.append(f"request {req}: max-abs {float((a.images - b.images).abs().max()):.3g}")
    return bad


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(runtime.__file__).parent / "assets" / "shapes"))
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="per thread")
    ap.add_argument("--sizes", default="64,48")
    ap.add_argument("--steps", default="4,6")
    ap.add_argument("--lora", action="store_true", help="a LoRA adapter on both pipelines, per-request scales")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the equality contract is stated for one intra-op thread
    t0 = time.perf_counter()
    pipes = build_pipes(args.model, lora=args.lora)
    setup = time.perf_counter() - t0
    requests = make_requests(args.threads * args.requests, sizes=tuple(map(int, args.sizes.split(","))),
                             steps=tuple(map(int, args.steps.split(","))), lora=args.lora)
    run_sequential(pipes, requests[: min(4, len(requests))])  # warm-up (first calls build kernels)
    t0 = time.perf_counter()
    seq = run_sequential(pipes, requests)
    seq_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    conc = run_concurrent(pipes, requests, args.threads)
    conc_wall = time.perf_counter() - t0
    bad = mismatches(requests, seq, conc)
    images = sum(r.num_images_per_prompt for r in requests)
    row = {"model": args.model, "lora": args.lora, "threads": args.threads, "requests": len(requests), "images": images,
           "setup_s": round(setup, 2), "mismatches": len(bad), "torch_threads": torch.get_num_threads()}
    for name, res, wall in (("sequential", seq, seq_wall), ("concurrent", conc, conc_wall)):
        lat = [r.seconds for r in res]
        row[name] = {"wall_s": round(wall, 2), "req_per_s": round(len(res) / wall, 3),
                     "img_per_s": round(images / wall, 3), "p50_s": round(percentile(lat, 50), 4),
                     "p99_s": round(percentile(lat, 99), 4)}
    print(json.dumps(row, indent=2))
    for line in bad[:10]:
        print("MISMATCH", line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "concurrency.json").write_text(json.dumps(row, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
