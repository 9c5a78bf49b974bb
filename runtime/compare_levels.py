"""One prompt at several optimization levels, side by side: time, adherence and parity per level.

``diffusion-runtime compare [MODEL] --prompt ... --levels 0 1 2 3`` loads the pipeline once, and for
each level calls ``runtime.optimize`` (which reverts the previous level first), runs the prompt
twice with the same seed (the first call includes compilation at level 2+, the second is the
steady-state time), scores the image against the prompt with the shapes scorer when the prompt
is in its grammar, and measures PSNR against the first level listed (level 0 by default: eager).
Writes one strip of images, left to right.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class LevelResult:
    level: int
    optimize_s: float
    first_call_s: float
    call_s: float
    image: np.ndarray  # (H, W, 3) uint8
    adherence: dict | None
    psnr_db: float | None  # against the first level run (the reference: None), inf when identical
    report: str


def _shapes_score(image: np.ndarray, prompt: str) -> dict | None:
    """The scorer's per-attribute result; None for a prompt outside the shapes grammar or an image
    the scorer cannot read (smaller than 32 pixels)."""
    from runtime.shapes import score

    try:
        return score(image, prompt)
    except ValueError:
        return None


def _call(pipe, prompt: str, steps: int, guidance: float, seed: int, negative_prompt: str | None):
    import torch

    from runtime.image_io import to_uint8

    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
               generator=generator, output_type="np")
    return time.perf_counter() - start, to_uint8(out.images[0])


def compare_levels(pipe, prompt: str, levels: list[int], steps: int = 20, guidance: float = 7.5,
                   seed: int = 0, negative_prompt: str | None = None) -> list[LevelResult]:
    """Run the prompt at each level on one pipeline; the pipeline is eager again afterwards."""
    from runtime.optim.parity import psnr
    from runtime import optimize

    results: list[LevelResult] = []
    reference = None
    try:
        for level in levels:
            start = time.perf_counter()
            optimize(pipe, level=level)
            optimize_s = time.perf_counter() - start
            first_s, _ = _call(pipe, prompt, steps, guidance, seed, negative_prompt)
            call_s, image = _call(pipe, prompt, steps, guidance, seed, negative_prompt)
            db = None if reference is None else psnr(image, reference)
            reference = image if reference is None else reference
            results.append(LevelResult(level, optimize_s, first_s, call_s, image, _shapes_score(image, prompt),
                                       db, str(pipe.optimization)))
    finally:
        optimization = getattr(pipe, "optimization", None)
        if optimization is not None:
            optimization.revert()
    return results


def format_table(results: list[LevelResult]) -> str:
    """A text table: one row per level; speed and PSNR are relative to the first row."""
    ref = results[0].level
    lines = [f"level  optimize  first call  per call  vs L{ref}  PSNR vs L{ref}  "
             "adherence (shape colour background position size: 1 = right)"]
    for r in results:
        speed = f"{results[0].call_s / r.call_s:5.2f}x"
        if r.psnr_db is None:
            db = "reference"
        else:
            db = "identical" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f} dB"
        if r.adherence is None:
            adh = "- (not a shapes prompt, or the image is too small to score)"
        else:
            adh = f"{r.adherence['overall']:.2f} (" + " ".join(
                str(int(r.adherence[k])) for k in ("shape", "colour", "background", "position", "size")) + ")"
        lines.append(f"{r.level:>5}  {r.optimize_s:7.2f}s  {r.first_call_s:9.2f}s  {r.call_s:7.3f}s  {speed}  "
                     f"{db:>10}  {adh}")
    return "\n".join(lines)


def strip(results: list[LevelResult], gap: int = 4):
    """The images left to right, on white, as a PIL image."""
    import PIL.Image

    h = max(r.image.shape[0] for r in results)
    w = sum(r.image.shape[1] for r in results) + gap * (len(results) - 1)
    canvas = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for r in results:
        canvas[: r.image.shape[0], x: x + r.image.shape[1]] = r.image
        x += r.image.shape[1] + gap
    return PIL.Image.fromarray(canvas)
