"""Build seeded random-weight SD-like checkpoints in diffusers layout, with diffusers (benchmarks and demos).

``python3 -m bench.make_checkpoint --model tiny|small|sd15 --out DIR [--seed 0]``

- tiny: a few hundred thousand parameters, 64x64 images; the demo and ``--quick`` model (seconds).
- small: the SD-like model of /work/shared/MEASURED.md: UNet 72.5M parameters (128/256/512 channels,
  cross-attention 512), a 6-layer CLIP text encoder of width 512, a 4-level VAE (scale factor 8).
- sd15: Stable Diffusion 1.5's architecture with random weights (about 1.07B parameters in all).

Written atomically (a temporary folder, then a rename); a folder already holding the same model,
seed and library versions is kept as it is; one made here with other settings is rebuilt; any
other existing folder is left alone unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

STAMP = "bench_checkpoint.json"
MODELS = ("tiny", "small", "sd15")
DEFAULT_SIZE = {"tiny": 64, "small": 256, "sd15": 256}  # image side the benchmark uses
NEEDS_GIB = {"tiny": 0.5, "small": 3.0, "sd15": 12.0}  # free memory to build it (init + save)

SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
VAE_DOWN, VAE_UP = "DownEncoderBlock2D", "UpDecoderBlock2D"


class CheckpointSkipped(RuntimeError):
    """This machine cannot build the model (memory); the message says why."""


def model_configs(name: str) -> dict:
    """Component configs of one model: unet, vae, text (CLIP text config) and tokenizer merges."""
    if name == "tiny":
        unet = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)
        vae = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        return dict(unet=unet, vae=vae, text=text, merges=200, vocab_size=None)
    if name == "small":
        # layers_per_block=2, 8 heads: 72.5M UNet parameters, as measured in MEASURED.md
        unet = dict(block_out_channels=[128, 256, 512], layers_per_block=2, cross_attention_dim=512,
                    attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=32)
        vae = dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, sample_size=256)
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8)
        return dict(unet=unet, vae=vae, text=text, merges=400, vocab_size=None)
    if name == "sd15":
        unet = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                    attention_head_dim=8, down_block_types=SD_DOWN, up_block_types=SD_UP, sample_size=64)
        vae = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768)
        return dict(unet=unet, vae=vae, text=text, merges=400, vocab_size=49408)  # CLIP's embedding size
    raise SystemExit(f"make_checkpoint: unknown model {name!r}; choose one of {', '.join(MODELS)}")


def scheduler_config() -> dict:
    """SD 1.5's PNDM scheduler (10 steps = 11 UNet calls)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def stamp_for(name: str, seed: int) -> dict:
    import diffusers
    import torch
    import transformers

    return {"model": name, "seed": seed, "configs": model_configs(name), "scheduler": scheduler_config(),
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__.split("+")[0]}


def available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _build(name: str, seed: int, folder: Path) -> None:
    """Build every component seeded, save the pipeline in diffusers layout into ``folder``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .clip_vocab import write_clip_vocab

    cfg = model_configs(name)
    tok_dir = folder.parent / (folder.name + "-tok")
    write_clip_vocab(tok_dir, cfg["merges"])
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    with torch.no_grad():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"]).eval()
        torch.manual_seed(seed + 1)
        vae_levels = len(cfg["vae"]["block_out_channels"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=[VAE_DOWN] * vae_levels,
                            up_block_types=[VAE_UP] * vae_levels, **cfg["vae"]).eval()
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=cfg["vocab_size"] or len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **cfg["text"])
        text_encoder = CLIPTextModel(text_config).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json"):  # CLIP's own files beside tokenizer.json
        shutil.copy(tok_dir / f, folder / "tokenizer" / f)
    shutil.rmtree(tok_dir, ignore_errors=True)


def build_checkpoint(name: str, out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Make (or keep) the checkpoint folder ``out``; raises CheckpointSkipped where memory is short."""
    out = Path(out).expanduser().resolve()
    stamp = stamp_for(name, seed)
    if out.exists():
        try:
            found = json.loads((out / STAMP).read_text())
        except (OSError, ValueError):
            found = None  # not a folder this script made: never replaced without --force
        if found == json.loads(json.dumps(stamp)) and not force:
            return out
        if found is None and not force:
            raise SystemExit(f"make_checkpoint: {out} exists and was not made by bench.make_checkpoint; "
                             "pass --force to replace it or choose another --out")
    need = NEEDS_GIB[name]
    if available_gib() < need:
        raise CheckpointSkipped(f"{name} needs about {need:.0f} GiB free memory to build; "
                                f"{available_gib():.1f} GiB available")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(name, seed, tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
        if out.exists():  # --force: move the old one aside first so a crash never leaves neither
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def parameter_counts(folder: str | Path) -> dict[str, int]:
    """Parameters per component, read from the safetensors headers (no weights loaded)."""
    import struct

    counts = {}
    for part in ("unet", "vae", "text_encoder"):
        total = 0
        for f in sorted((Path(folder) / part).glob("*.safetensors")):
            with open(f, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            for key, meta in header.items():
                if key != "__metadata__":
                    n = 1
                    for d in meta["shape"]:
                        n *= d
                    total += n
        counts[part] = total
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.make_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--out", required=True, help="checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = build_checkpoint(args.model, args.out, args.seed, args.force)
    except CheckpointSkipped as e:
        print(f"make_checkpoint: skipped: {e}", file=sys.stderr)
        return 3
    counts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parameter_counts(folder).items())
    print(f"{folder}: {args.model} (seed {args.seed}; {counts} parameters) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
