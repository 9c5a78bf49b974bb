"""The one rule by which a derived weight copy follows its source (docs/ARCHITECTURE.md §4).

Passes keep copies made from a model's weights: prepack's oneDNN-packed weights, Winograd's
transformed kernels, the upsample fold's 2x2 phase kernels, the fused GEGLU kernel's packed
weight. Each copy lives in a cache dict, and each use goes through ``derived(cache, source)``:
the cache is emptied, so the copy is made again, whenever the source is no longer the tensor the
copy was made from. "The same tensor" means the same storage address, the same version counter
and the same dtype. That sees:

- ``load_state_dict`` and any other in-place edit outside ``torch.inference_mode`` (the version
  counter moves);
- a new Parameter or new storage (``module.weight = ...``, ``.to(dtype)``, ``.to(memory_format)``,
  precision and revert swapping tensors back): the address or dtype changes.

It cannot see, by construction (re-optimize after them):

- edits through ``weight.data`` (``.data`` is a tensor with its own version counter, so the
  parameter's counter does not move);
- in-place edits of inference tensors (weights created or converted inside ``inference_mode``
  carry no version counter), and in-place edits made inside ``inference_mode``;
- an edit that frees a storage and allocates a new one at the same address with the same dtype
  and version count (in practice: a replaced Parameter that is then edited back to the old count).

A copy, once made, serves the calls; the pass then calls ``served(source)``, so a source on file
pages (precision's converted weights, runtime/optim/snapshot.py) hands its pages back until a call
reads it again: a weight and its derived copy are not both in memory.

Fused QKV's concatenated projections (runtime/models/attention.py) are made once, when fused, and
do not follow later edits of ``to_q`` / ``to_k`` / ``to_v`` by themselves: ``refresh_fused_projections()``
copies the parts into them again in place (``fuse_lora`` / ``unfuse_lora`` do), or unfuse and fuse again.
"""
from __future__ import annotations

import torch


def source_key(source: torch.Tensor) -> tuple:
    """What identifies ``source`` for the rule: storage address, version (None: inference tensor), dtype."""
    return source.data_ptr(), None if source.is_inference() else source._version, source.dtype


def derived(cache: dict, *sources: torch.Tensor) -> dict:
    """``cache``, emptied first when ``sources`` are not those its entries were made from."""
    owner = tuple(source_key(s) for s in sources) if len(sources) != 1 else source_key(sources[0])
    if cache.get("owner") != owner:
        cache.clear()
        cache["owner"] = owner
    return cache


def served(*sources: torch.Tensor) -> None:
    """Say that a copy just made from ``sources`` serves their calls from now on. A source that lies on
    file pages (the converted weights precision leaves there, runtime/optim/snapshot.py) gives its pages
    back to the kernel, those written since excepted; a call that reads it again (a fallback: another
    dtype, autograd, tracing) reads them from the file, the same bytes. Other sources are left alone."""
    from .snapshot import give_back

    for source in sources:
        give_back(source)


weight_cache = derived  # the name the passes used for it before
