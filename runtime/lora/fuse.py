"""Fusing adapters into the base weights, and giving the base back bit for bit.

``fuse`` writes ``original + sum of the fused adapters' deltas`` into each adapted layer's weight in
place (``weight.copy_`` under ``no_grad``: the version counter moves, so prepack's and Winograd's
derived copies follow, runtime/optim/derived.py) and keeps a copy of the original. ``unfuse`` copies
the original back: the same bits in fp32 and bf16 after any number of cycles. Nothing is ever
subtracted. Each fused adapter's delta is peft's ``get_delta_weight`` (``(B @ A) * scaling``, in fp32).

A weight can have several live copies: the parameter's current tensor, and the tensors an
optimization pass holds to put back on revert (precision's fp32 originals, runtime/optim/snapshot.py).
Fusing writes every copy, so a revert keeps the adapters fused; a copy made after the fuse (precision
converting a fused weight) is recognised as derived from the fused one and restored from the saved
original in its own dtype. Fused QKV / KV projections copy their parts: they are refreshed in place
after each change (``refresh_fused_projections``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.errors import LoraError


def _key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape)


def held_views(model: nn.Module) -> list[dict[int, torch.Tensor]]:
    """For each live tensor snapshot holding this model's parameters: ``id(param) -> held tensor``."""
    from runtime.optim.snapshot import live_snapshots

    ids = {id(p) for p in model.parameters()}
    views = []
    for snap in live_snapshots():
        view = snap.held(ids)  # only this model's: another pipeline's spilled originals stay spilled
        if view:
            views.append(view)
    return views


def _live(param: torch.nn.Parameter, views) -> dict[tuple, torch.Tensor]:
    """The parameter's live copies, keyed by storage; the current one written through the parameter."""
    live = {}
    for view in views:
        t = view.get(id(param))
        if t is not None:
            live.setdefault(_key(t), t)
    live[_key(param)] = param  # writing through the Parameter moves its version counter
    return live


def delta_weight(adapter, scaling: float, weight_shape, device) -> torch.Tensor:
    """peft's delta in fp32: ``(B @ A) * scaling`` (convolutions: 1x1 as a matmul, else as a convolution)."""
    a = adapter.source_down.to(device=device, dtype=torch.float32)
    b = adapter.source_up.to(device=device, dtype=torch.float32)
    if a.ndim == 2:
        return (b @ a) * scaling
    if tuple(weight_shape[2:4]) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    return F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3) * scaling


def _original(entry, key: tuple, t: torch.Tensor, record: bool = True) -> torch.Tensor:
    """The saved original for copy ``t``; a copy first seen now is either the original itself (nothing
    fused yet) or was derived from a fused copy (then: the saved original, converted the same way)."""
    if key in entry.originals:
        return entry.originals[key][1]
    if not entry.originals:
        orig = t.detach().clone() if record else t.detach()
    else:
        saved = [o for _, o in entry.originals.values()]
        best = next((o for o in saved if o.dtype == torch.float32), saved[0])
        orig = best.to(device=t.device, dtype=t.dtype)
    if record:
        entry.originals[key] = (t.detach(), orig)
    return orig


def _composed(entry, orig: torch.Tensor, fused) -> torch.Tensor:
    if not fused:
        return orig
    w = orig.to(torch.float32).clone()
    for name, scaling in fused:
        w += delta_weight(entry.adapters[name], scaling, orig.shape, orig.device)
    return w.to(orig.dtype)


def _targets(entry, layer, views) -> dict[tuple, torch.Tensor]:
    """Every copy to write: the recorded ones, then the live ones (which take precedence)."""
    targets = {k: t for k, (t, _) in entry.originals.items()}
    targets.update(_live(layer.weight, views))
    return targets


def check_finite(entry, layer, views, fused, where: str) -> None:
    """``safe_fusing``: the weights ``fused`` would give, checked before anything is written."""
    for key, t in _targets(entry, layer, views).items():
        orig = _original(entry, key, t, record=False)
        w = _composed(entry, orig, fused)
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            names = ", ".join(repr(n) for n, _ in fused)
            raise LoraError(f"fuse_lora(safe_fusing=True): fusing adapter(s) {names} into {where} would give {bad} "
                            f"NaN/inf value(s) of {w.numel()}; nothing was fused")


def write(entry, layer, views) -> None:
    """Write ``original + deltas of entry.fused`` (or the original) into every copy of the weight."""
    # outside inference mode, so the version counters move (runtime/optim/derived.py); no autograd
    with torch.inference_mode(False), torch.no_grad():
        for key, t in _targets(entry, layer, views).items():
            orig = _original(entry, key, t)
            t.copy_(_composed(entry, orig, entry.fused))
    if not entry.fused:
        entry.originals.clear()


def projection_paths(model: nn.Module) -> list[tuple[nn.Module, nn.Module, list[nn.Module]]]:
    """``(attention module, fused linear, its parts)`` for every fused QKV / KV projection of ``model``."""
    out = []
    for module in model.modules():
        get = getattr(module, "fused_projection", None)
        if getattr(module, "fused", None) and get is not None:
            fused, parts = get()
            out.append((module, fused, parts))
    return out


def refresh_projections(model: nn.Module, layers: set[int], views) -> None:
    """Fused projections whose parts include one of ``layers`` (ids): concatenated again, in place, in
    the current tensors and in each held view."""
    with torch.inference_mode(False), torch.no_grad():
        for module, fused, parts in projection_paths(model):
            if not any(id(p) in layers for p in parts):
                continue
            module.refresh_fused_projection()
            for view in views:
                for name in ("weight", "bias"):
                    target = getattr(fused, name, None)
                    sources = [getattr(p, name, None) for p in parts]
                    if target is None or any(s is None for s in sources) or id(target) not in view:
                        continue
                    held = [view.get(id(s)) for s in sources]
                    if any(h is None for h in held):
                        continue
                    view[id(target)].copy_(torch.cat([h.to(view[id(target)].dtype) for h in held], dim=0))
