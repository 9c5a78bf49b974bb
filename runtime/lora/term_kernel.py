"""Which implementation adds an adapted layer's LoRA term on CPU, in bf16 or fp32: the two matmuls (the down
product, then ``addmm_`` of the up product into the output) or our one-pass kernel (runtime/kernels/lora_cpu.py).

Measured, as every routing choice is (runtime/optim/dispatch.py): on the first call with a given shape
(rows, input width, packed rank, output width) and dtype both run on inputs of that shape and the faster is kept for
the process, the matmuls unless the kernel wins by the dispatch margin; the machine's dispatch cache keeps
the timing, so a later process reads it. Nothing is measured where the kernel cannot run (no AVX512-BF16 for
bf16, no AVX-512 for fp32: the reason is in ``choices()``) or while torch.compile traces (the matmuls are what it sees).
"""
from __future__ import annotations

import threading

import torch

from runtime.kernels import lora_cpu
from runtime.optim import dispatch

KERNEL, MATMULS = "lora kernel", "two matmuls"
_choices: dict[tuple, tuple[bool, dispatch.Measurement | str]] = {}  # (m, k, r, n, dtype) -> (kernel runs, why)
_lock = threading.Lock()


def use_kernel(m: int, k: int, r: int, n: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel adds the term of a ``dtype`` call with ``m`` rows, ``k`` inputs, packed rank ``r`` and
    ``n`` outputs (measured on first use; after that, one lookup per call)."""
    key = (m, k, r, n, dtype)
    found = _choices.get(key)
    if found is None:
        with _lock:
            found = _choices.get(key)
            if found is None:
                how = _measure(key)
                found = _choices[key] = (isinstance(how, dispatch.Measurement) and how.choice == KERNEL, how)
    return found[0]


def _measure(key) -> dispatch.Measurement | str:
    m, k, r, n, dtype = key
    name = str(dtype).removeprefix("torch.")
    why = lora_cpu.cpu_lora_term_ready(dtype)
    if why is not None:
        return why
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    down = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    up = torch.zeros(n, r, dtype=dtype)  # a zero term: ``out`` stays as it is however often it runs
    out_a, out_b = torch.zeros(m, n, dtype=dtype), torch.zeros(m, n, dtype=dtype)
    kd, ku = lora_cpu.lora_kernel_weights(down, up, dtype)
    candidates = [dispatch.Candidate(MATMULS, lambda: out_a.addmm_(x @ down.t(), up.t()), baseline=True),
                  dispatch.Candidate(KERNEL, lambda: lora_cpu.lora_term_launch(out_b, x, kd, ku, 1.0))]
    return dispatch.measure(dispatch.OpKey("lora term", key[:4], name), candidates)


def choices() -> dict[tuple, str]:
    """What each shape measured so far runs, with the times, by (m, k, r, n, dtype name): for reports and tests."""
    return {(*key[:4], str(key[4]).removeprefix("torch.")): how if isinstance(how, str) else how.summary()
            for key, (_, how) in _choices.items()}


def forget() -> None:
    """Measure again on next use (tests; a changed thread count)."""
    with _lock:
        _choices.clear()
