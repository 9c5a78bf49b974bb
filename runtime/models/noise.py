"""Seeded Gaussian noise drawn exactly as diffusers draws it, so equal seeds give equal images.

The rule (diffusers' ``randn_tensor``): a CPU generator draws on the CPU and the result moves to
the target device; a list of generators draws one batch row per generator.
"""
from __future__ import annotations

import torch

from .errors import InputError


def randn_tensor(
    shape: tuple[int, ...] | list[int] | torch.Size,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn from ``generator``."""
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    draw_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, (list, tuple)) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise InputError(f"randn_tensor: cannot draw a {device.type} tensor from a {gen_type} generator")
            draw_device = torch.device("cpu")  # why: CPU generators give device-independent noise
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise InputError(f"randn_tensor: {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
