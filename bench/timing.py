"""One timed generation: end-to-end seconds and the time of every UNet call, through a proxy on ``pipe.unet``.

Why a proxy and not forward hooks: our compile pass compiles the module's ``_call_impl``, hooks
included, so a hook that reads the clock would be traced (or break the full graph). The proxy
times the call from outside and forwards every attribute to the real module.
"""
from __future__ import annotations

import time

import numpy as np
import torch


class TimedUNet:
    """Stands in for ``pipe.unet`` during a run; records the wall time of each call."""

    def __init__(self, unet):
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "calls", [])

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._unet(*args, **kwargs)
        self.calls.append(time.perf_counter() - start)
        return out

    def __getattr__(self, name):
        return getattr(self._unet, name)

    def __setattr__(self, name, value):
        setattr(self._unet, name, value)


def initial_latents(pipe, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The same starting noise for every configuration (both implementations draw nothing themselves)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (batch, pipe.unet.config.in_channels, height // factor, width // factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def generate(pipe, call: dict, latents: torch.Tensor) -> tuple[np.ndarray, float, list[float]]:
    """Run the pipeline once; returns (images as float arrays in [0, 1], seconds, UNet call seconds)."""
    real = pipe.unet
    proxy = TimedUNet(real)
    object.__setattr__(pipe, "unet", proxy)  # past diffusers' __setattr__, which would re-register it
    try:
        start = time.perf_counter()
        out = pipe(**call, latents=latents.clone(), output_type="np")  # grad mode: the pipeline's own
        elapsed = time.perf_counter() - start
    finally:
        object.__setattr__(pipe, "unet", real)
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, torch.Tensor):
        images = images.float().cpu().numpy()
    return np.asarray(images, dtype=np.float32), elapsed, list(proxy.calls)
