"""Initial noise drawn exactly as diffusers draws it, so one seed gives one image in both."""
from __future__ import annotations

import torch


def seeded_randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``.

    The rule diffusers follows (and users' seeds depend on): a CPU generator draws on the CPU and
    the result moves to ``device``; a list of generators draws sample ``i`` of the batch from
    generator ``i`` (a list of one counts as a single generator).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"cannot draw {device} noise from a generator on {first.device}")
        draw_device = torch.device("cpu")  # why: CPU generators give the same numbers on every machine
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        one = (1,) + shape[1:]
        parts = [torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
