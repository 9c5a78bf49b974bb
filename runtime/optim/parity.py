"""Parity metrics between an optimized output and the eager reference."""
from __future__ import annotations

import math

import numpy as np
import torch


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu().numpy()
    if hasattr(x, "convert"):  # PIL image
        return np.asarray(x.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(x, (list, tuple)):
        return np.stack([_as_float64(i) for i in x])
    arr = np.asarray(x)
    return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)


def max_abs(a, b) -> float:
    """Largest absolute difference, in float64."""
    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"max_abs: shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, data_range]; inf when identical."""
    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)
