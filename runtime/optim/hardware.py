"""What the device runs fast: detected from the hardware, never guessed."""
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


# Why our AVX512-BF16 matmul kernels (Winograd convolutions, the fused GEGLU projection, attention) step
# aside on CPUs with AMX tiles: oneDNN's (and PyTorch's flash attention's) bf16 matmuls run on the tiles
# there, at several times the vdpbf16ps rate ours run at (Intel's figures: 1024 bf16 multiply-adds per
# cycle and core on AMX against 64 on AVX512-BF16); Winograd saves 2.25x. Not measured: no AMX machine here.
AMX_REASON = ("this CPU has AMX tiles, where oneDNN's bf16 matmuls are expected to outrun our AVX512-BF16 kernel "
              "(not measured on AMX)")


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (Intel Sapphire Rapids and later)."""
    return _cpu().amx


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
