"""The limit: FLOPs of one UNet step (torch.utils.flop_counter) against this machine's measured matmul peak."""
from __future__ import annotations

import statistics
import time

import torch


def matmul_gflops(dtype: torch.dtype, size: int = 2048, runs: int = 5, budget_s: float = 0.5) -> float:
    """Best-of-``runs`` GFLOP/s of a square matmul in ``dtype`` (2 n^3 FLOPs), after one warm-up.

    The side is ``size``, or smaller where one product of that side would take over ``budget_s``
    (estimated from a 256-wide one): a CPU without native bf16 runs bf16 matmuls one or two orders
    of magnitude below its fp32 rate, and a 2048-wide one would take minutes there."""
    gen = torch.Generator().manual_seed(0)
    side = min(size, 256)
    while True:
        a = torch.randn(side, side, generator=gen).to(dtype)
        b = torch.randn(side, side, generator=gen).to(dtype)
        torch.mm(a, b)
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        if side >= size or took * 8 > budget_s:  # doubling the side costs 8x the time
            break
        side = min(size, side * 2)
    best = took
    for _ in range(runs - 1):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * side**3 / best / 1e9


def matmul_peaks(size: int = 2048, runs: int = 5) -> dict[str, float]:
    """What the suite compares every achieved rate with: fp32 and bf16 matmul GFLOP/s on this machine
    (each at the largest side up to ``size`` that the time budget allows; ``matmul_gflops``)."""
    return {"size": size, "fp32_gflops": round(matmul_gflops(torch.float32, size, runs), 1),
            "bf16_gflops": round(matmul_gflops(torch.bfloat16, size, runs), 1)}


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """q @ k^T and attn @ v, 2 FLOPs per multiply-add, on (B, H, T, D) shapes."""
    b, h, s_q, d = query
    return 2 * b * h * s_q * key[-2] * d + 2 * b * h * s_q * key[-2] * value[-1]


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` as torch's flop counter sees them (matmuls, convolutions, attention).

    torch's table has no entry for the CPU flash-attention kernel (it would count attention as 0,
    a third of the work at 512x512), so it is added here with the same formula as the GPU kernels.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_flops  # keyed by the overload packet, as torch's own table is
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def unet_step_flops(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> int:
    """FLOPs of one UNet call on the given inputs (the batch the pipeline uses, e.g. 2 with guidance)."""
    return count_flops(lambda: unet(sample, timestep, encoder_hidden_states=encoder_hidden_states))


def limit_figures(step_flops: int | None, step_seconds: float | None, peaks: dict | None) -> dict:
    """Achieved GFLOP/s of a step and its fraction of the fp32 and bf16 matmul peaks.

    For configurations that skip work (DeepCache, ToMe, TGATE) the rate is "effective": the eager
    step's FLOPs over the faster time, so it can exceed what the hardware does.
    """
    if not step_flops or not step_seconds or not peaks:
        return {"achieved_gflops": None, "fraction_of_fp32_peak": None, "fraction_of_bf16_peak": None}
    achieved = step_flops / step_seconds / 1e9
    return {"achieved_gflops": round(achieved, 2),
            "fraction_of_fp32_peak": round(achieved / peaks["fp32_gflops"], 4),
            "fraction_of_bf16_peak": round(achieved / peaks["bf16_gflops"], 4)}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
