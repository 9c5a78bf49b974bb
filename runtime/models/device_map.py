"""``from_pretrained(device_map=..., max_memory=...)`` without accelerate.

A device map says where each submodule goes: ``{"": "cuda:0"}`` (everything), or module
prefixes (``{"conv_in": "cpu", "down_blocks.0": 0, "": "cuda"}``; the longest prefix wins), or
one of diffusers' strategies (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``),
which are planned here as accelerate's "sequential" fill: top-level children in order, onto each
GPU while its ``max_memory`` budget lasts, the rest on the CPU. ``"disk"`` keeps a module's
weights on the CPU as the memory-mapped safetensors tensors they were loaded as (the OS pages
them in and out), so ``offload_folder`` is accepted but nothing is written there.

Submodules placed on a device other than the model's first are given a forward pre-hook that
moves their tensor inputs there, so a split model still runs (outputs stay where they were made).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device(value, where: str):
    """A map value as a torch.device, or the string "disk"."""
    if value == "disk":
        return "disk"
    if isinstance(value, bool):
        raise InputError(f"{where}: {value!r} is not a device")
    if isinstance(value, int):
        if value < 0:
            raise InputError(f"{where}: device index {value} is negative (use 'cpu' for the CPU)")
        value = torch.device("cuda", value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{where}: {value!r} is not a device name (e.g. 'cpu', 'cuda:0', 0, 'disk')") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{where}: {value!r} needs a CUDA device, and torch sees none")
        if (device.index or 0) >= count:
            raise InputError(f"{where}: {value!r} but torch sees only {count} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"{where}: {value!r} needs an MPS device, and torch sees none")
    return device


def normalize_device_map(device_map, low_cpu_mem_usage: bool):
    """Check ``device_map`` before anything is read: None, a strategy name, or ``{prefix: device}``."""
    if device_map is None:
        return None
    if not low_cpu_mem_usage:
        raise InputError(f"from_pretrained: device_map={device_map!r} needs low_cpu_mem_usage=True (the default)")
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, dict):
        out = {}
        for key, value in device_map.items():
            if not isinstance(key, str):
                raise InputError(f"device_map: key {key!r} is not a module name (a string; '' is the whole model)")
            out[key] = _device(value, f"device_map[{key!r}]")
        return out
    return {"": _device(device_map, "device_map")}


def parse_max_memory(max_memory) -> dict:
    """``{0: "10GiB", "cpu": "30GiB"}`` -> ``{torch.device: bytes}`` (checked, sizes parsed)."""
    from .safetensors_io import parse_size

    if max_memory is None:
        return {}
    if not isinstance(max_memory, dict):
        raise InputError(f"max_memory must be a dict of device -> size, got {max_memory!r}")
    out = {}
    for key, size in max_memory.items():
        device = "disk" if key == "disk" else _device(key, f"max_memory[{key!r}]")
        try:
            out[device] = parse_size(size)
        except Exception as exc:
            raise InputError(f"max_memory[{key!r}]: {size!r} is not a size (bytes or e.g. '10GiB'): {exc}") from None
    return out


def _tensor_bytes(module: nn.Module, dtype: torch.dtype | None) -> int:
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        size = (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
        total += t.numel() * size
    return total


def plan_sequential(sizes: list[tuple[str, int]], budgets: list[tuple[object, float]]) -> dict:
    """Place ``(name, bytes)`` in order onto ``budgets`` ``[(device, bytes), ...]``, last one unbounded."""
    plan, index, used = {}, 0, 0
    for name, size in sizes:
        while index < len(budgets) - 1 and used + size > budgets[index][1]:
            index, used = index + 1, 0
        plan[name] = budgets[index][0]
        used += size
    return plan


def auto_device_map(model: nn.Module, max_memory: dict, dtype: torch.dtype | None) -> dict:
    """A strategy name -> a concrete map for this machine (see the module docstring)."""
    budgets = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            device = torch.device("cuda", i)
            if device in max_memory:
                budgets.append((device, max_memory[device]))
            elif not max_memory:
                budgets.append((device, torch.cuda.mem_get_info(i)[0] * 0.9))
    cpu = torch.device("cpu")
    if "disk" in max_memory:
        budgets.append((cpu, max_memory.get(cpu, float("inf"))))
        budgets.append(("disk", float("inf")))
    else:
        budgets.append((cpu, float("inf")))
    total = _tensor_bytes(model, dtype)
    if total <= budgets[0][1]:
        return {"": budgets[0][0]}
    sizes = [(name, _tensor_bytes(child, dtype)) for name, child in model.named_children()]
    return plan_sequential(sizes, budgets)


def _move_inputs(device: torch.device):
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    def hook(module, args, kwargs):
        return move(args), move(kwargs)

    return hook


def dispatch(model: nn.Module, device_map: dict) -> dict:
    """Move each mapped submodule (shortest prefix first, so longer ones win); returns the map used."""
    for key in device_map:
        if key:
            try:
                model.get_submodule(key)
            except AttributeError:
                raise InputError(f"device_map: {key!r} names no submodule of {type(model).__name__}") from None
    placed: list[tuple[str, object]] = sorted(device_map.items(), key=lambda kv: len(kv[0]))
    for key, device in placed:
        if device != "disk":
            (model.get_submodule(key) if key else model).to(device)
    devices = {("cpu" if d == "disk" else str(d)) for d in device_map.values()}
    if len(devices) > 1:
        for key, device in placed:
            if key:
                target = torch.device("cpu") if device == "disk" else device
                model.get_submodule(key).register_forward_pre_hook(_move_inputs(target), with_kwargs=True)
    return {k: ("disk" if d == "disk" else str(d)) for k, d in device_map.items()}
