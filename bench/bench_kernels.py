"""Triton kernels against PyTorch on Stable Diffusion's shapes: time, TFLOP/s, GB/s and error.

``python3 -m bench.bench_kernels [--dtype fp16|bf16] [--json rows.jsonl] [--quick]``

- attention: kernels.attention vs F.scaled_dot_product_attention (whatever backend PyTorch picks),
  SD 1.5 at 512px (head_dim 40/80/160, self-attention and 77-token cross-attention) and SDXL at
  1024px (head_dim 64). TFLOP/s counts the two matmuls, 4 * B * H * Tq * Tk * D.
- group_norm (+SiLU): kernels.group_norm vs F.group_norm then F.silu, UNet and VAE activations,
  NCHW and channels_last. GB/s counts one read of x and one write of y (what an ideal kernel moves).
- geglu: kernels.geglu vs F.linear + chunk + value * F.gelu(gate) (diffusers' GEGLU), SD 1.5's
  feed-forward widths. TFLOP/s counts the matmul, 2 * M * K * 2D.

Beside every timing: the max abs error of each side against the fp32 reference. Medians of
triton.testing.do_bench (warm-up, then repeats with the L2 cache flushed). Needs a CUDA GPU and
Triton; without them it says so and exits 0. Ratios are what to compare across machines.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime import kernels

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (name, batch, heads, q tokens, k tokens, head_dim); batch 2 = classifier-free guidance.
ATTENTION_SHAPES = [
    ("sd15-64x64-self", 2, 8, 4096, 4096, 40),
    ("sd15-64x64-cross", 2, 8, 4096, 77, 40),
    ("sd15-32x32-self", 2, 8, 1024, 1024, 80),
    ("sd15-16x16-self", 2, 8, 256, 256, 160),
    ("sd15-8x8-cross", 2, 8, 64, 77, 160),
    ("sdxl-64x64-self", 2, 10, 4096, 4096, 64),
    ("sdxl-32x32-self", 2, 20, 1024, 1024, 64),
    ("sdxl-32x32-cross", 2, 20, 1024, 77, 64),
    ("vae-64x64-self", 1, 1, 4096, 4096, 512),  # VAE mid-block: one 512-wide head, reported as unsupported
]
# (name, shape, groups)
GROUP_NORM_SHAPES = [
    ("unet-320x64x64", (2, 320, 64, 64), 32),
    ("unet-640x32x32", (2, 640, 32, 32), 32),
    ("unet-1280x16x16", (2, 1280, 16, 16), 32),
    ("unet-1280x8x8", (2, 1280, 8, 8), 32),
    ("vae-512x64x64", (1, 512, 64, 64), 32),
    ("vae-256x256x256", (1, 256, 256, 256), 32),
    ("vae-128x512x512", (1, 128, 512, 512), 32),
]
# (name, tokens M, in_features K, half width D)
GEGLU_SHAPES = [
    ("sd15-64x64", 2 * 4096, 320, 1280),
    ("sd15-32x32", 2 * 1024, 640, 2560),
    ("sd15-16x16", 2 * 256, 1280, 5120),
]


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


def row(op, name, dtype, settings, ours_ms, torch_ms, ours_err, torch_err, flops=None, nbytes=None) -> dict:
    r = dict(op=op, shape=name, dtype=str(dtype).replace("torch.", ""), settings=settings,
             ours_ms=ours_ms, torch_ms=torch_ms, speedup=torch_ms / ours_ms,
             ours_max_err=ours_err, torch_max_err=torch_err)
    if flops is not None:
        r.update(ours_tflops=flops / ours_ms / 1e9, torch_tflops=flops / torch_ms / 1e9)
    if nbytes is not None:
        r.update(ours_gbps=nbytes / ours_ms / 1e6, torch_gbps=nbytes / torch_ms / 1e6)
    return r


def bench_attention(dtype, quick: bool):
    for name, b, h, tq, tk, d in ATTENTION_SHAPES[: 3 if quick else None]:
        # (B, T, H, D) buffers seen as (B, H, T, D): the strided layout the UNet hands the backend
        q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=dtype).transpose(1, 2) for t in (tq, tk, tk))
        reason = kernels.attention_supports(q, k, v)
        if reason is not None:
            print(f"skip attention {name}: {reason}")
            continue
        ref = kernels.attention_ref(q, k, v)
        ours_err = max_err(kernels.attention(q, k, v), ref)
        torch_err = max_err(F.scaled_dot_product_attention(q, k, v), ref)
        del ref
        ours = bench_ms(lambda: kernels.attention(q, k, v))
        theirs = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        nbytes = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()  # q, k, v in; out as big as q
        yield row("attention", name, dtype, dict(batch=b, heads=h, q_tokens=tq, k_tokens=tk, head_dim=d),
                  ours, theirs, ours_err, torch_err, flops=4 * b * h * tq * tk * d, nbytes=nbytes)


def bench_group_norm(dtype, quick: bool):
    for name, shape, groups in GROUP_NORM_SHAPES[: 2 if quick else None]:
        for layout in ("nchw", "channels_last"):
            x = torch.randn(shape, device="cuda", dtype=dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            weight = torch.randn(shape[1], device="cuda", dtype=dtype)
            bias = torch.randn(shape[1], device="cuda", dtype=dtype)
            ref = kernels.group_norm_ref(x, groups, weight, bias, 1e-5, silu=True)

            def ours():
                return kernels.group_norm(x, groups, weight, bias, 1e-5, silu=True)

            def theirs():
                return F.silu(F.group_norm(x, groups, weight, bias, 1e-5))

            yield row("group_norm_silu", name, dtype, dict(shape=list(shape), groups=groups, layout=layout),
                      bench_ms(ours), bench_ms(theirs), max_err(ours(), ref), max_err(theirs(), ref),
                      nbytes=2 * x.numel() * x.element_size())


def bench_geglu(dtype, quick: bool):
    for name, m, k, d in GEGLU_SHAPES[: 1 if quick else None]:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        weight = torch.randn(2 * d, k, device="cuda", dtype=dtype) * k ** -0.5
        bias = torch.randn(2 * d, device="cuda", dtype=dtype)
        ref = kernels.geglu_ref(x, weight, bias)

        def theirs():
            value, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
            return value * F.gelu(gate)

        flops = 2 * m * k * 2 * d
        nbytes = (x.numel() + weight.numel() + m * d) * x.element_size()
        yield row("geglu", name, dtype, dict(tokens=m, in_features=k, half_width=d),
                  bench_ms(lambda: kernels.geglu(x, weight, bias)), bench_ms(theirs),
                  max_err(kernels.geglu(x, weight, bias), ref), max_err(theirs(), ref), flops=flops, nbytes=nbytes)
        proj = F.linear(x, weight, bias)
        value, gate = proj.chunk(2, dim=-1)
        act_ref = (value.float() * F.gelu(gate.float()))
        yield row("geglu_activation", name, dtype, dict(tokens=m, half_width=d),
                  bench_ms(lambda: kernels.geglu_activation(proj)), bench_ms(lambda: value * F.gelu(gate)),
                  max_err(kernels.geglu_activation(proj), act_ref), max_err(value * F.gelu(gate), act_ref),
                  nbytes=(proj.numel() + m * d) * proj.element_size())


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict]) -> None:
    print(f"{'op':<17} {'shape':<20} {'dtype':<9} {'ours ms':>8} {'torch ms':>9} {'speedup':>8} "
          f"{'TFLOP/s':>15} {'GB/s':>15} {'err ours/torch':>20}")
    for r in rows:
        tflops = f"{r['ours_tflops']:.1f}/{r['torch_tflops']:.1f}" if "ours_tflops" in r else "-"
        gbps = f"{r['ours_gbps']:.0f}/{r['torch_gbps']:.0f}" if "ours_gbps" in r else "-"
        layout = r["settings"].get("layout", "")
        print(f"{r['op']:<17} {(r['shape'] + ' ' + layout).strip():<20} {r['dtype']:<9} {r['ours_ms']:>8.3f} "
              f"{r['torch_ms']:>9.3f} {r['speedup']:>7.2f}x {tflops:>15} {gbps:>15} "
              f"{r['ours_max_err']:>9.2e}/{r['torch_max_err']:.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="default: fp16 and bf16")
    parser.add_argument("--json", type=Path, help="append one JSON row per measurement to this file")
    parser.add_argument("--quick", action="store_true", help="a few shapes per kernel")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU: none is visible here (the kernels run on CPU only in "
              "Triton's interpreter, which is for tests, not timing). Nothing measured.")
        return 0
    if not kernels.triton_available() or kernels.interpreter_mode():
        print("bench_kernels needs compiled Triton: install it (pip install 'diffusion-runtime[triton]') "
              "and unset TRITON_INTERPRET. Nothing measured.")
        return 0
    machine = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=__import__("triton").__version__, python=platform.python_version(), commit=commit())
    print(json.dumps(machine))
    rows = []
    with torch.inference_mode():
        for dtype_name in args.dtype or ["fp16", "bf16"]:
            for bench in (bench_attention, bench_group_norm, bench_geglu):
                rows.extend(bench(DTYPES[dtype_name], args.quick))
    print_table(rows)
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps({**machine, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
