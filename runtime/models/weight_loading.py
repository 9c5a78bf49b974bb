"""Put a checkpoint's tensors into a model built on the meta device, with every check named.

Order of events in ``load_weights``:
1. One load-state-dict pre-hook per module is registered *after* the module's own hooks, so a
   model that renames keys in a pre-hook (the CLIP encoders accept two layouts) has already
   renamed them when ours runs. Ours checks the shape of each of the module's own tensors
   (ShapeMismatchError naming key, expected and found shape) and casts to the target dtype.
2. ``load_state_dict(assign=True, strict=False)``; missing and unexpected keys come from its
   return value (after any renaming), never from comparing key sets ourselves.
3. Missing keys are a MissingWeightsError; unexpected keys a logged warning naming them; a shape
   mismatch is a ShapeMismatchError, or with ``ignore_mismatched_sizes`` a warning (the model
   keeps its own initialised tensor, as diffusers does).
4. Non-persistent buffers (not in any checkpoint, e.g. ``position_ids``) are still on the meta
   device. A module that owns such buffers (or whose children do) may define
   ``_init_non_persistent_buffers()`` to recompute them in place on the CPU (the fast path).
   Without one, a second construction of the model with only its parameters on meta (buffers
   real, no parameter memory) supplies the values; a buffer neither path produces is an error.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from .errors import CheckpointError, MissingWeightsError, ShapeMismatchError
from .meta_build import parameters_on_meta

logger = logging.getLogger(__name__)
SHOW_KEYS = 20  # keys listed by name in an error or warning; the rest are counted


def list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOW_KEYS])
    more = f" ... and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
    return f"{len(keys)} key(s): {shown}{more}"


def _target_dtype(found: torch.Tensor, own: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and found.is_floating_point() and own.is_floating_point():
        return dtype
    return own.dtype


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    own = {n: p for n, p in module._parameters.items() if p is not None}
    own.update({n: b for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set})
    return own


def _check_and_cast_hook(mismatches: list[tuple[str, tuple, tuple]], dtype: torch.dtype | None):
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name, own in _own_tensors(module).items():
            key = prefix + name
            found = state_dict.get(key)
            if not isinstance(found, torch.Tensor):
                continue
            if found.shape != own.shape:
                mismatches.append((key, tuple(own.shape), tuple(found.shape)))
                del state_dict[key]  # keep torch from raising its own message; we raise ours after
                continue
            target = _target_dtype(found, own, dtype)
            if found.dtype != target:
                state_dict[key] = found.to(target)

    return hook


@contextmanager
def _shape_and_dtype_hooks(model: nn.Module, mismatches: list, dtype: torch.dtype | None):
    handles = [m.register_load_state_dict_pre_hook(_check_and_cast_hook(mismatches, dtype)) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def load_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    dtype: torch.dtype | None = None,
    assign: bool = True,
    rebuild=None,
    ignore_mismatched_sizes: bool = False,
) -> dict:
    """Load ``state_dict`` into ``model`` (see the module docstring); ``source`` names the files.

    ``rebuild``: a callable returning a fresh model with real buffers, used only for step 4.
    ``ignore_mismatched_sizes``: a weight whose shape differs keeps the model's own (freshly
    initialised) value, with a warning naming key and both shapes, instead of a
    ShapeMismatchError; the model must then be built with real tensors (``assign=False``).
    Returns diffusers' loading-info dict: ``missing_keys``, ``unexpected_keys``,
    ``mismatched_keys`` (``(key, checkpoint shape, model shape)``) and ``error_msgs``.
    """
    mismatches: list[tuple[str, tuple, tuple]] = []
    with _shape_and_dtype_hooks(model, mismatches, dtype):
        result = model.load_state_dict(state_dict, strict=False, assign=assign)
    name = type(model).__name__
    if mismatches and not ignore_mismatched_sizes:
        lines = "; ".join(f"{k}: model expects {list(e)}, checkpoint has {list(f)}" for k, e, f in mismatches[:SHOW_KEYS])
        more = f" ... and {len(mismatches) - SHOW_KEYS} more" if len(mismatches) > SHOW_KEYS else ""
        raise ShapeMismatchError(
            f"{source}: {len(mismatches)} weight(s) have a shape that does not fit "
            f"{name}'s config: {lines}{more} (pass ignore_mismatched_sizes=True, and "
            f"low_cpu_mem_usage=False, to keep the model's freshly initialised weights for these)"
        )
    mismatched = {k for k, _, _ in mismatches}
    missing = sorted(k for k in result.missing_keys if k not in mismatched)
    if missing:
        raise MissingWeightsError(
            f"{source}: the checkpoint lacks weights that {name} needs "
            f"(they would stay uninitialized): {list_keys(missing)}"
        )
    if result.unexpected_keys:
        logger.warning(
            "%s: weights not used by %s were ignored: %s",
            source, name, list_keys(sorted(result.unexpected_keys)),
        )
    if mismatches:
        logger.warning(
            "Some weights of %s were not initialized from the model checkpoint at %s and are newly "
            "initialized because the shapes did not match:\n%s\nYou should probably TRAIN this model on a "
            "down-stream task to be able to use it for predictions and inference.",
            name, source,
            "\n".join(f"- {k}: found shape {torch.Size(f)} in the checkpoint and {torch.Size(e)} in the model "
                      "instantiated" for k, e, f in mismatches),
        )
    if assign:
        materialize_buffers(model, rebuild, source)
    return {
        "missing_keys": missing,
        "unexpected_keys": sorted(result.unexpected_keys),
        "mismatched_keys": [(k, torch.Size(f), torch.Size(e)) for k, e, f in mismatches],
        "error_msgs": [],
    }


def _meta_buffers(model: nn.Module) -> list[str]:
    return [name for name, b in model.named_buffers() if b.is_meta]


def materialize_buffers(model: nn.Module, rebuild, source: str) -> None:
    """Step 4 of the module docstring: no tensor may stay on the meta device."""
    if not _meta_buffers(model):
        return
    for module in model.modules():
        hook = getattr(module, "_init_non_persistent_buffers", None)
        if callable(hook) and any(b.is_meta for b in module.buffers()):  # its own or its children's
            with torch.device("cpu"):
                hook()
    remaining = _meta_buffers(model)
    if remaining and rebuild is not None:
        with parameters_on_meta():
            fresh = rebuild()
        real = dict(fresh.named_buffers())
        for name in remaining:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if name in real and not real[name].is_meta:
                owner._buffers[leaf] = real[name]
        remaining = _meta_buffers(model)
    if remaining:
        raise CheckpointError(
            f"{source}: buffers still on the meta device after loading (not in the checkpoint and "
            f"not recomputed; define _init_non_persistent_buffers() on their module): {list_keys(remaining)}"
        )
    stray = [n for n, p in model.named_parameters() if p.is_meta]
    if stray:
        raise CheckpointError(f"{source}: parameters still on the meta device after loading: {list_keys(stray)}")
