"""Peak memory of the memory controls, each configuration in a fresh process.

``python3 -m bench.bench_memory run [--out DIR] [--vae-size 1024] [--small FOLDER] [--quick]``

- ``vae``: SD 1.5's VAE (its config, random seeded weights saved once in diffusers' layout) decoding
  one latent of ``--vae-size`` pixels: ours and diffusers', untiled and tiled (``enable_tiling``),
  and ours sliced for a batch of 2 against unsliced.
- ``pipeline``: the bench ``small`` checkpoint (bench/make_checkpoint.py) at 256x256: eager,
  attention slicing "auto" and "max", VAE tiling, VAE slicing, and ``optimize`` level 2; for level 2
  also the RSS after load, after optimize and after the call, where the originals its revert needs
  are (in memory, left to the checkpoint file, spilled: runtime/optim/snapshot.py) and the MiB of
  derived weight copies (packed, transformed) by kind and model, to say where level 2's memory goes.

Every child prints one JSON line: ``peak_rss_mib`` (VmHWM, bench/machine.py), ``before_mib`` (RSS
once the model is loaded, before the measured work), seconds. The parent writes ``rows.jsonl`` and
``table.md`` under ``--out`` and prints the table. Measured figures: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                in_channels=3, out_channels=3, norm_num_groups=32)
DEFAULT_OUT = Path("bench/out/memory")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def sd15_vae_folder(root: Path) -> Path:
    """SD 1.5's VAE config with seeded random weights, written once by diffusers."""
    folder = root / "sd15-vae-seed0"
    if (folder / "config.json").exists():
        return folder
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).eval()
    tmp = root / "sd15-vae-seed0.tmp"
    vae.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


# ---- children -------------------------------------------------------------------------------------

def child_vae(args) -> dict:
    import torch

    from .machine import peak_rss_mib

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.impl == "diffusers":
        from diffusers import AutoencoderKL
    else:
        from runtime import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(args.folder).eval()
    for p in vae.parameters():  # touch every weight: the memory-mapped file is resident like a loaded model
        p.data.sum()
    if args.tiling:
        vae.enable_tiling()
    if args.slicing:
        vae.enable_slicing()
    side = args.size // 8
    z = torch.randn(args.batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    before = rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(z).sample
    seconds = time.perf_counter() - start
    return {"before_mib": before, "peak_rss_mib": peak_rss_mib(), "seconds": seconds,
            "checksum": float(image.double().abs().mean())}


def _storage(t) -> tuple[int, int]:
    """(identity, bytes) of a tensor's storage; oneDNN's packed (opaque) tensors by object and size."""
    try:
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError):
        return id(t), t.numel() * t.element_size()


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or dicts / lists of them); meta tensors count nothing."""
    import torch

    if isinstance(obj, torch.Tensor):
        return 0 if obj.device.type == "meta" else _storage(obj)[1]
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _held(pipe) -> dict:
    """MiB the optimization holds beside the model's tensors: the originals each pass's tensor snapshots
    keep, by where they are (runtime/optim/snapshot.py: memory, file, spill), and the derived weight
    copies (runtime/optim/derived.py) by kind and model."""
    from runtime.models.resnet import Upsample2D
    from runtime.models.transformer_2d import GEGLU

    out = {}
    for p in pipe.optimization.applied:
        for snapshot in p.log().snapshots():
            for place, nbytes in snapshot.where().items():
                if place != "module":
                    key = f"{p.name} originals: {place}"
                    out[key] = out.get(key, 0) + nbytes
    for name, model in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        for mod in model.modules():
            found = []
            for entry_name, impl in getattr(mod, "compute", ()):
                for attr in ("packed_cache", "winograd_cache"):
                    found.append((f"{entry_name} {type(mod).__name__}", getattr(impl, attr, None)))
            if isinstance(mod, Upsample2D) and mod.conv_2x is not None:
                for c2 in (mod.conv_2x, getattr(mod.conv_2x, "previous", None)):
                    if c2 is None:
                        continue
                    found.append((f"{type(c2).__name__}", getattr(c2, "cache", None)))
                    if hasattr(c2, "folded"):
                        found.append(("upsample fold", [c2.folded.weight, c2.folded.bias, c2.packed.packed_cache]))
            if isinstance(mod, GEGLU) and mod.fused is not None:
                found.append(("geglu fused", getattr(mod.fused, "packed_cache", None)))
            for kind, obj in found:
                nbytes = _tensor_bytes(obj)
                if nbytes:
                    key = f"{kind} ({name})"
                    out[key] = out.get(key, 0) + nbytes
    return {k: round(v / 2**20, 1) for k, v in sorted(out.items())}


def _model_mib(pipe) -> float:
    total = 0
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return round(total / 2**20, 1)


def child_pipeline(args) -> dict:
    import torch

    import runtime

    from .machine import peak_rss_mib

    torch.set_num_threads(args.threads or torch.get_num_threads())
    pipe = runtime.StableDiffusionPipeline.from_pretrained(args.folder)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        for p in m.parameters():
            p.data.sum()
    loaded = rss_mib()
    record = {"loaded_mib": loaded, "model_mib": _model_mib(pipe)}
    config = args.config
    if config.startswith("slicing-"):
        value = config.split("-", 1)[1]
        pipe.enable_attention_slicing(int(value) if value.isdigit() else value)
    elif config == "vae-tiling":
        pipe.vae.enable_tiling()
    elif config == "vae-slicing":
        pipe.vae.enable_slicing()
    elif config.startswith("L"):
        start = time.perf_counter()
        runtime.optimize(pipe, level=int(config[1:]))
        record["optimize_s"] = time.perf_counter() - start
        record["after_optimize_mib"] = rss_mib()
        record["model_mib_after"] = _model_mib(pipe)
        record["held_mib"] = _held(pipe)
    before = rss_mib()
    kwargs = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np",
                  num_images_per_prompt=args.batch)
    start = time.perf_counter()
    pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0), **kwargs)
    second = time.perf_counter() - start
    record.update({"before_mib": before, "peak_rss_mib": peak_rss_mib(), "first_call_s": first,
                   "seconds": second, "after_call_mib": rss_mib()})
    if getattr(pipe, "optimization", None) is not None:  # packed copies are made at the first call
        record["held_after_call_mib"] = _held(pipe)
    return record


# ---- parent ---------------------------------------------------------------------------------------

def _run_child(argv: list[str], timeout: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.bench_memory", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    from .machine import cpu_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    common = ["--threads", str(args.threads)] if args.threads else []
    if not args.skip_vae:
        folder = sd15_vae_folder(out)
        vae_configs = [("diffusers", False, False, 1), ("ours", False, False, 1), ("ours", True, False, 1),
                       ("diffusers", True, False, 1), ("ours", False, False, 2), ("ours", False, True, 2)]
        if args.vae_rows:
            vae_configs = [vae_configs[int(i)] for i in args.vae_rows.split(",")]
        for impl, tiling, slicing, batch in vae_configs:
            name = f"{impl} VAE decode {args.vae_size}px" + (" tiled" if tiling else "") + (
                f" batch {batch}" if batch > 1 else "") + (" sliced" if slicing else "")
            argv = ["vae", "--impl", impl, "--folder", str(folder), "--size", str(args.vae_size),
                    "--batch", str(batch)] + (["--tiling"] if tiling else []) + (["--slicing"] if slicing else [])
            row = {"name": name, **_run_child(argv + common, args.timeout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.small:
        for config in args.configs.split(","):
            argv = ["pipeline", "--folder", args.small, "--config", config, "--size", str(args.size),
                    "--steps", str(args.steps), "--batch", str(args.batch)]
            row = {"name": f"{Path(args.small).name} {args.size}px {config}", **_run_child(argv + common, args.timeout)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = [f"CPU: {cpu_model()}", "", "| configuration | RSS before MiB | peak RSS MiB | peak - before MiB | s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['name']} | {r['before_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['before_mib']:.0f} | {r['seconds']:.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.bench_memory")
    sub = parser.add_subparsers(dest="mode", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", default=str(DEFAULT_OUT))
    p_run.add_argument("--vae-size", type=int, default=1024)
    p_run.add_argument("--skip-vae", action="store_true")
    p_run.add_argument("--vae-rows", default=None, help="indices into the VAE rows: 0 diffusers, 1 ours, "
                       "2 ours tiled, 3 diffusers tiled, 4 ours batch 2, 5 ours batch 2 sliced")
    p_run.add_argument("--small", default=None, help="a bench checkpoint folder for the pipeline rows (small, sd15)")
    p_run.add_argument("--configs", default="eager,slicing-auto,slicing-max,vae-tiling,vae-slicing,L2")
    p_run.add_argument("--size", type=int, default=256)
    p_run.add_argument("--steps", type=int, default=4)
    p_run.add_argument("--batch", type=int, default=1)
    p_run.add_argument("--threads", type=int, default=0)
    p_run.add_argument("--timeout", type=int, default=1800)
    p_vae = sub.add_parser("vae")
    p_vae.add_argument("--impl", choices=("ours", "diffusers"), required=True)
    p_vae.add_argument("--folder", required=True)
    p_vae.add_argument("--size", type=int, default=1024)
    p_vae.add_argument("--batch", type=int, default=1)
    p_vae.add_argument("--tiling", action="store_true")
    p_vae.add_argument("--slicing", action="store_true")
    p_vae.add_argument("--threads", type=int, default=0)
    p_pipe = sub.add_parser("pipeline")
    p_pipe.add_argument("--folder", required=True)
    p_pipe.add_argument("--config", required=True)
    p_pipe.add_argument("--size", type=int, default=256)
    p_pipe.add_argument("--steps", type=int, default=4)
    p_pipe.add_argument("--batch", type=int, default=1)
    p_pipe.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "run":
        return run(args)
    record = child_vae(args) if args.mode == "vae" else child_pipeline(args)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
