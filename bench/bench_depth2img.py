"""Depth-to-image at each optimization level, against diffusers eager on the same weights.

    python3 -m bench.bench_depth2img --size 256 --steps 10 --calls 2

The model: the bench's ``small`` checkpoint (bench/make_checkpoint.py) with its UNet widened for
depth (5 input channels: the small UNet's weights, and seeded random weights of the same scale for the
depth channel of ``conv_in``, as SD 2 depth was made from SD 2) and a small random hybrid DPT estimator (ViT + BiT,
the layout of the SD 2 depth checkpoint's estimator; a few million parameters), saved in diffusers'
depth layout. Each configuration loads the folder, makes one warm-up call and times ``--calls``
calls (median), strength 0.7, the depth estimated from the image (the estimator runs in every call).
Prints a markdown table: seconds per image, speed-up over diffusers eager, the largest pixel difference
from diffusers (0-255 scale) and the PSNR against it; diffusers in bf16 is the row to read levels 2-3's
PSNR against (the same rounding, on the same weights). ``--depth-map`` passes a fixed depth map instead
of running the estimator.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a red circle on a blue background"
BACKBONE = {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
            "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
            "hidden_sizes": [96, 192, 384, 768], "num_groups": 2}


def build_depth_folder(small: Path, out: Path) -> Path:
    """The small checkpoint as a depth pipeline (see the module docstring); kept when already built."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    if (out / "model_index.json").exists():
        return out
    base = diffusers.UNet2DConditionModel.from_pretrained(small, subfolder="unet")
    unet_config = dict(base.config)
    unet_config["in_channels"] = 5
    unet = diffusers.UNet2DConditionModel.from_config(unet_config).eval()
    state = base.state_dict()
    weight = state["conv_in.weight"]  # (C, 4, 3, 3): the depth channel gets weights of the same scale
    torch.manual_seed(5)
    extra = torch.randn_like(weight[:, :1]) * weight.std()
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    unet.load_state_dict(state)
    torch.manual_seed(6)
    estimator = DPTForDepthEstimation(DPTConfig(
        image_size=384, patch_size=16, num_channels=3, hidden_size=64, num_hidden_layers=4,
        backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=128, hidden_act="gelu",
        is_hybrid=True, backbone_config=BACKBONE, backbone_featmap_shape=[1, 384, 24, 24])).eval()
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(small, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(small, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(small, subfolder="tokenizer"),
        unet=unet, scheduler=diffusers.DDIMScheduler.from_pretrained(small, subfolder="scheduler"),
        depth_estimator=estimator, feature_extractor=DPTImageProcessor(size={"height": 384, "width": 384}))
    pipe.save_pretrained(str(out))
    return out


def init_image(size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def depth_map(size: int) -> torch.Tensor:
    """A smooth (1, H, W) depth ramp: what --depth-map passes instead of running the estimator."""
    ramp = torch.linspace(0.0, 1.0, size)
    return (ramp[None, :] + 0.5 * ramp[:, None])[None]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def timed(pipe, image, steps: int, calls: int, depth=None):
    def call():
        return pipe(PROMPT, image=image, strength=0.7, num_inference_steps=steps, depth_map=depth,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    out = call()  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--levels", default="0,1,2,3")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--depth-map", action="store_true", help="pass a fixed depth map (the estimator does not run)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "diffusion-runtime-bench-depth"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    import runtime
    from bench.make_checkpoint import build_checkpoint

    work = Path(args.workdir)
    folder = build_depth_folder(build_checkpoint("small", work / "small-seed0"), work / "small-depth")
    image = init_image(args.size)
    depth = depth_map(args.size) if args.depth_map else None
    diffusers.utils.logging.set_verbosity_error()
    ref = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(folder))
    ref.set_progress_bar_config(disable=True)
    base_s, base_img = timed(ref, image, args.steps, args.calls, depth)
    del ref
    rows = [("diffusers eager fp32", base_s, 0.0, float("inf"), "")]
    half = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(str(folder)).to(torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    half_s, half_img = timed(half, image, args.steps, args.calls, depth)
    del half
    half_img = half_img.astype(np.float32)
    rows.append(("diffusers bf16 (the peer of levels 2-3)", half_s,
                 float(np.abs(half_img.astype(np.float64) - base_img.astype(np.float64)).max() * 255),
                 psnr(half_img, base_img), "pipe.to(torch.bfloat16)"))
    for level in [int(v) for v in args.levels.split(",")]:
        pipe = runtime.StableDiffusionDepth2ImgPipeline.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        if level:
            runtime.optimize(pipe, level=level)
        seconds, img = timed(pipe, image, args.steps, args.calls, depth)
        diff = float(np.abs(img.astype(np.float64) - base_img.astype(np.float64)).max() * 255)
        quality = psnr(img, base_img)
        applied = ", ".join(p.name for p in pipe.optimization.applied) if level else "eager"
        rows.append((f"ours level {level}", seconds, diff, quality, applied))
        del pipe
    source = "a fixed depth_map" if args.depth_map else "depth from the estimator"
    print(f"\ndepth2img, small (5-channel UNet), {args.size}x{args.size}, {args.steps} DDIM steps, strength 0.7, "
          f"{source}, median of {args.calls} calls, {torch.get_num_threads()} threads\n")
    print("| configuration | s per image | vs diffusers eager | max pixel diff vs diffusers | PSNR vs diffusers dB | passes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, seconds, diff, quality, applied in rows:
        print(f"| {label} | {seconds:.3f} | {base_s / seconds:.2f}x | {diff:.1f} | {quality:.1f} | {applied} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
