"""Model-level LoRA operations: attach, hotswap, activate and weight, enable, fuse, delete, unload.

These work on one model (a UNet or a CLIP text encoder) and are what the model methods
(runtime/lora/model_mixin.py) and the pipeline methods (runtime/lora/pipeline_mixin.py) call. After
each change ``sync`` puts the ``"lora"`` entry into each adapted layer's compute chain, or takes it
out, at its place in ``ORDER`` (runtime/optim/undo.py), and rebuilds the layers' packed adapters.
The entries are not in any pass's undo log: a revert of ``optimize`` leaves the adapters on.
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from runtime.models.errors import LoraError

from . import fuse as fusing
from .entry import AdapterWeights, LoraEntry, padded
from .state import AdapterInfo, LoraState, drop_state, lora_state, natural_component
from .weights import LoraLayer

logger = logging.getLogger(__name__)


def _label(model: nn.Module, component: str | None) -> str:
    return component or natural_component(model)


# ---- compile freezing --------------------------------------------------------------------------
def frozen_compiled(model: nn.Module) -> bool:
    """Whether ``model`` (or a block of it) runs inductor code compiled with freezing (runtime/optim/compile.py)."""
    return any(getattr(m.__dict__.get("call_with"), "freezing", False) for m in model.modules())


def check_not_frozen(model: nn.Module, what: str, component: str | None = None) -> None:
    if frozen_compiled(model):
        raise LoraError(
            f"{what}: the {_label(model, component)} is compiled with inductor freezing, which bakes its weights "
            "(and any adapter tensors) into the compiled code as constants, so a LoRA change would be ignored. "
            "Revert the optimization first (pipe.optimization.revert()), or optimize with "
            "compile={'freezing': False}; with adapters loaded before optimize, compile turns freezing off itself")


# ---- plugging ----------------------------------------------------------------------------------
def sync(model: nn.Module, state: LoraState) -> None:
    """Each adapted layer's chain holds this entry exactly when it should; packs rebuilt (in place)."""
    from runtime.optim.undo import chain_with, chain_without, entry as chain_entry

    for path, entry in list(state.entries.items()):
        layer = model.get_submodule(path)
        plugged = chain_entry(layer, "lora")
        want = entry.wants_plug()
        if plugged is not None and (plugged is not entry or not want):
            layer.compute = chain_without(layer.compute, "lora")
            plugged = None
        if want:
            entry.rebuild(layer)
            if plugged is None:
                layer.compute = chain_with(layer.compute, "lora", entry)
        else:
            entry.drop_packs()
        if not entry.adapters:
            del state.entries[path]


def default_name(state: LoraState | None) -> str:
    """diffusers' ``default_<n>``, n counting the adapters the model holds (the next free one)."""
    n = len(state.adapters) if state is not None else 0
    taken = set(state.adapters) if state is not None else set()
    while f"default_{n}" in taken:
        n += 1
    return f"default_{n}"


def _weights(lora: LoraLayer, target_rank: int | None) -> AdapterWeights:
    rank = lora.rank
    alpha = float(lora.alpha) if lora.alpha is not None else float(rank)
    down, up = lora.down, lora.up
    pad = target_rank is not None
    if pad:
        down, up = padded(down, target_rank, 0), padded(up, target_rank, 1)
    return AdapterWeights(down=down, up=up, source_down=lora.down, source_up=lora.up, rank=rank, alpha=alpha,
                          scaling=alpha / rank, padded=pad)


def _check_target_rank(resolved: Mapping, target_rank: int | None, name: str, label: str) -> None:
    if target_rank is None:
        return
    for path, (_, lora) in resolved.items():
        if lora.rank > target_rank:
            raise LoraError(f"adapter {name!r}: {label}.{path} has rank {lora.rank}, above the hotswap target_rank "
                            f"{target_rank} (enable_lora_hotswap(target_rank=...) must be at least the largest rank)")


def check_attach(model: nn.Module, resolved: Mapping[str, tuple], adapter_name: str | None, *,
                 hotswap: bool = False, component: str | None = None) -> str:
    """Everything ``attach`` would refuse, checked without changing anything; returns the adapter name."""
    label = _label(model, component)
    check_not_frozen(model, "load_lora_adapter", component)
    state = lora_state(model)
    if hotswap:
        if adapter_name is None or state is None or adapter_name not in state.adapters:
            loaded = list(state.adapters) if state is not None else []
            raise LoraError(f"hotswap=True: the {label} has no adapter named {adapter_name!r} to replace "
                            f"(loaded: {loaded}); pass the name of a loaded adapter, or hotswap=False")
        info = state.adapters[adapter_name]
        extra = [p for p in resolved if p not in set(info.paths)]
        if extra:
            raise LoraError(f"hotswap of {adapter_name!r}: the new weights adapt {label}.{extra[0]}, which adapter "
                            f"{adapter_name!r} does not; hotswapping replaces weights in place and cannot adapt new "
                            "layers (load it as another adapter instead)")
        if any(adapter_name in (n for n, _ in state.entries[p].fused) for p in info.paths):
            raise LoraError(f"hotswap of {adapter_name!r}: the adapter is fused into the {label}; unfuse_lora() first")
        for path, (_, lora) in resolved.items():
            a = state.entries[path].adapters[adapter_name]
            if a.padded and lora.rank > a.down.shape[0]:
                raise LoraError(f"hotswap of {adapter_name!r}: {label}.{path} has rank {lora.rank}, above the hotswap "
                                f"target_rank {a.down.shape[0]} (enable_lora_hotswap(target_rank=...) before loading "
                                "the first adapter)")
        return adapter_name
    name = adapter_name if adapter_name is not None else default_name(state)
    if state is not None and name in state.adapters:
        raise LoraError(f"adapter name {name!r} is already in use in the {label} (loaded: {list(state.adapters)}); "
                        f"pass another adapter_name, delete_adapters({name!r}) first, or hotswap=True to replace "
                        "its weights")
    _check_target_rank(resolved, state.target_rank if state is not None else None, name, label)
    return name


def attach(model: nn.Module, resolved: Mapping[str, tuple], adapter_name: str | None, *, hotswap: bool = False,
           source: str = "the LoRA state dict", component: str | None = None) -> str:
    """Add (or, with ``hotswap``, replace in place) one adapter; ``resolved`` from resolve.resolve_layers."""
    name = check_attach(model, resolved, adapter_name, hotswap=hotswap, component=component)
    if hotswap:
        _hotswap(model, lora_state(model), name, resolved, source)
        return name
    state = lora_state(model, create=True)
    for path, (layer, lora) in resolved.items():
        entry = state.entries.get(path)
        if entry is None:
            entry = state.entries[path] = LoraEntry(state, path, layer)
        entry.adapters[name] = _weights(lora, state.target_rank)
    state.adapters[name] = AdapterInfo(name, list(resolved), source)
    state.active = [name]  # as with peft: the adapter loaded last is the active one
    sync(model, state)
    return name


@torch.no_grad()
def _hotswap(model, state: LoraState, name: str, resolved: Mapping, source: str) -> None:
    """The new weights into adapter ``name``'s buffers (checked by ``check_attach``)."""
    info = state.adapters[name]
    for path in info.paths:
        a = state.entries[path].adapters[name]
        new = resolved.get(path)
        if new is None:  # a layer the new adapter leaves alone adds nothing (peft zeroes it)
            lora = LoraLayer(torch.zeros_like(a.source_down), torch.zeros_like(a.source_up))
        else:
            lora = new[1]
        rank = lora.rank
        if a.padded:
            a.down.zero_()
            a.down[:rank].copy_(lora.down)
            a.up.zero_()
            a.up[:, :rank].copy_(lora.up)
        else:
            a.down, a.up = lora.down, lora.up
        a.source_down, a.source_up = lora.down, lora.up
        a.rank = rank
        a.alpha = float(lora.alpha) if lora.alpha is not None else float(rank)
        a.scaling = a.alpha / rank  # peft's hotswap resets the scaling to the new alpha / rank
    info.source = source
    sync(model, state)


# ---- activity and weights ----------------------------------------------------------------------
def normalize_weights(names, weights) -> tuple[list[str], list]:
    names = [names] if isinstance(names, str) else list(names)
    if not isinstance(weights, list):
        weights = [weights] * len(names)
    if len(names) != len(weights):
        raise LoraError(f"set_adapters: {len(names)} adapter name(s) but {len(weights)} weight(s)")
    return names, [1.0 if w is None else w for w in weights]


def set_adapters(model: nn.Module, names, weights=None, *, check: bool = True, component: str | None = None) -> None:
    """Activate ``names`` with ``weights`` (numbers, or per-block dicts for a UNet)."""
    from .block_weights import expand_unet_weights, module_weight

    check_not_frozen(model, "set_adapters", component)
    names, weights = normalize_weights(names, weights)
    state = lora_state(model)
    if check:
        known = list(state.adapters) if state is not None else []
        missing = [n for n in names if n not in known]
        if missing:
            raise LoraError(f"set_adapters: adapter(s) {missing} not loaded in the {_label(model, component)} "
                            f"(loaded: {known})")
    if state is None:
        return
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        weights = expand_unet_weights(model, weights)
    seen: dict[str, object] = {}
    for n, w in zip(names, weights):
        seen.setdefault(n, w)
    state.active = list(seen)
    for path, entry in state.entries.items():
        for n, w in seen.items():
            a = entry.adapters.get(n)
            if a is not None:
                a.scaling = module_weight(w, path) * a.base_scale
    sync(model, state)


def set_enabled(model: nn.Module, enabled: bool, component: str | None = None) -> None:
    """``enable_lora`` / ``disable_lora``. Disabling unfuses fused layers first, as peft does (a disabled
    merged layer unmerges), so the model computes its base weights."""
    state = lora_state(model)
    if state is None:
        return
    check_not_frozen(model, "enable_lora" if enabled else "disable_lora", component)
    if not enabled:
        unfuse(model, component)
    state.enabled = enabled
    sync(model, state)


def active_adapters(model: nn.Module) -> list[str]:
    state = lora_state(model)
    return list(state.active) if state is not None else []


def list_adapters(model: nn.Module) -> list[str]:
    state = lora_state(model)
    return list(state.adapters) if state is not None else []


# ---- fuse ----------------------------------------------------------------------------------------
def fuse(model: nn.Module, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None,
         component: str | None = None) -> list[str]:
    """peft's merge: each layer's active adapters' scaling times ``lora_scale`` (kept, as peft keeps it),
    then ``adapter_names`` (default: the active ones) fused into the weights. Returns the names fused."""
    state = lora_state(model)
    if state is None:
        return []
    check_not_frozen(model, "fuse_lora", component)
    label = _label(model, component)
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    views = fusing.held_views(model)
    plan = []
    for path, entry in state.entries.items():
        active = [n for n in state.active if n in entry.adapters]
        scalings = {n: a.scaling * (lora_scale if n in active else 1.0) for n, a in entry.adapters.items()}
        wanted = adapter_names if adapter_names is not None else state.active
        already = {n for n, _ in entry.fused}
        adds = [(n, scalings[n]) for n in dict.fromkeys(wanted) if n in entry.adapters and n not in already]
        plan.append((path, entry, scalings, adds))
    if safe_fusing:
        for path, entry, _, adds in plan:
            if adds:
                fusing.check_finite(entry, model.get_submodule(path), views, entry.fused + adds, f"{label}.{path}")
    fused_names: set[str] = set()
    touched = set()
    for path, entry, scalings, adds in plan:
        for n, s in scalings.items():
            entry.adapters[n].scaling = s
        if adds:
            entry.fused = entry.fused + adds
            layer = model.get_submodule(path)
            fusing.write(entry, layer, views)
            touched.add(id(layer))
        fused_names.update(n for n, _ in entry.fused)
    if touched:
        fusing.refresh_projections(model, touched, views)
    sync(model, state)
    return sorted(fused_names)


def unfuse(model: nn.Module, component: str | None = None) -> None:
    """Copy the saved originals back into every fused layer (bit for bit)."""
    state = lora_state(model)
    if state is None:
        return
    fused = [(p, e) for p, e in state.entries.items() if e.fused or e.originals]
    if not fused:
        return
    check_not_frozen(model, "unfuse_lora", component)
    views = fusing.held_views(model)
    touched = set()
    for path, entry in fused:
        entry.fused = []
        layer = model.get_submodule(path)
        fusing.write(entry, layer, views)
        touched.add(id(layer))
    fusing.refresh_projections(model, touched, views)
    sync(model, state)


def fused_adapters(model: nn.Module) -> set[str]:
    state = lora_state(model)
    if state is None:
        return set()
    return {n for e in state.entries.values() for n, _ in e.fused}


# ---- delete / unload -----------------------------------------------------------------------------
def delete_adapters(model: nn.Module, names, component: str | None = None) -> list[str]:
    """Remove adapters (a fused one leaves the weights first); returns the names that were there."""
    names = [names] if isinstance(names, str) else list(names)
    state = lora_state(model)
    if state is None:
        return []
    present = [n for n in names if n in state.adapters]
    if not present:
        return []
    check_not_frozen(model, "delete_adapters", component)
    views = fusing.held_views(model)
    touched = set()
    for name in present:
        for path in state.adapters[name].paths:
            entry = state.entries[path]
            entry.adapters.pop(name, None)
            if any(n == name for n, _ in entry.fused):
                entry.fused = [(n, s) for n, s in entry.fused if n != name]
                layer = model.get_submodule(path)
                fusing.write(entry, layer, views)
                touched.add(id(layer))
        del state.adapters[name]
        if name in state.active:
            state.active = [n for n in state.active if n != name]
            if not state.active and state.adapters:
                first = next(iter(state.adapters))
                logger.warning("deleted the last active adapter %r of the %s; %r is active now (as with peft)",
                               name, _label(model, component), first)
                state.active = [first]
    if touched:
        fusing.refresh_projections(model, touched, views)
    sync(model, state)
    if not state.adapters and state.target_rank is None:
        drop_state(model)
    return present


def unload(model: nn.Module, component: str | None = None) -> None:
    """Every adapter off: fused layers get their originals back, entries leave the chains, state dropped."""
    state = lora_state(model)
    if state is None:
        return
    check_not_frozen(model, "unload_lora_weights", component)
    unfuse(model, component)
    for entry in state.entries.values():
        entry.adapters.clear()
    state.adapters.clear()
    sync(model, state)
    drop_state(model)


def set_device(model: nn.Module, names, device) -> None:
    """``set_lora_device``: move the adapters' tensors; packs are made again on use (cast on use)."""
    state = lora_state(model)
    if state is None:
        return
    names = [names] if isinstance(names, str) else list(names)
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for entry in state.entries.values():
        for n in names:
            a = entry.adapters.get(n)
            if a is None:
                continue
            a.down, a.up = a.down.to(device), a.up.to(device)
            a.source_down, a.source_up = a.source_down.to(device), a.source_up.to(device)
    sync(model, state)


def enable_hotswap(model: nn.Module, target_rank: int = 128, check_compiled: str = "error",
                   component: str | None = None) -> None:
    """Adapters loaded from now on get fixed-rank buffers of ``target_rank`` (hotswaps then copy in place)."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise LoraError(f"enable_lora_hotswap: check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1:
        raise LoraError(f"enable_lora_hotswap: target_rank must be a positive int, got {target_rank!r}")
    state = lora_state(model)
    if state is not None and state.adapters:
        message = (f"enable_lora_hotswap: call it before loading the first adapter (the {_label(model, component)} "
                   f"already holds {list(state.adapters)}, which keep their ranks)")
        if check_compiled == "error":
            raise LoraError(message)
        if check_compiled == "warn":
            logger.warning(message)
    state = lora_state(model, create=True)
    state.target_rank = target_rank
    sync(model, state)
