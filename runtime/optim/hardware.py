"""What the device computes natively: detected from the hardware, never guessed (which implementation is
faster is measured, runtime/optim/dispatch.py)."""
from __future__ import annotations

import torch


def _cpu():
    # imported here: importing runtime.kernels fixes Triton's interpreter mode (runtime/kernels/__init__.py)
    from runtime.kernels import cpu_features

    return cpu_features.current()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX tiles (bf16 matmuls run several times fp32's rate there)."""
    cpu = _cpu()
    return cpu.avx512_bf16 or cpu.amx


# Which of our kernels or oneDNN's / SDPA's runs an operation is not decided here from flags: it is
# measured on the model's own shapes at optimize time (runtime/optim/dispatch.py).


def fast_half_dtype(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The reduced-precision dtype this device computes fast in, and why (or None and why not)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"CUDA {torch.cuda.get_device_name(device)} supports bf16"
        return torch.float16, f"CUDA {torch.cuda.get_device_name(device)} without bf16: fp16"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return torch.bfloat16, "CPU has native bf16 (AVX512-BF16/AMX)"
        return None, "CPU has no native bf16 (no AVX512-BF16/AMX) and fp16 is slow on CPUs"
    return None, f"no reduced-precision rule for device type {device.type!r}"
