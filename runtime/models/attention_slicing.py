"""Sliced attention: diffusers' ``set_attention_slice`` semantics, run through the ``backend`` slot.

diffusers' ``SlicedAttnProcessor`` flattens (batch, heads) into one axis and computes attention
``slice_size`` rows of it at a time, so the (tokens x tokens) score matrices of only that many
heads are alive at once. Here each slice goes through the module's own ``Attention.backend``
(docs/ARCHITECTURE.md §3), so whatever backend a pass or the user set (SDPA, our CPU kernels,
Triton, xformers) computes every slice; slicing never replaces the backend, and the attention
pass replacing the backend never drops slicing.

``UNet2DConditionModel.set_attention_slice(slice_size)`` (``AttentionSlicingMixin``) takes
diffusers' values: ``"auto"`` (half of each module's head count), ``"max"`` (one head at a
time), an int for every module, a list with one entry per attention module (in module order),
or ``None`` (off). A slice larger than a module's head count is a ``ValueError``, as in diffusers.
"""
from __future__ import annotations

import torch


def sliced_attention(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     slice_size: int) -> torch.Tensor:
    """``backend(q, k, v, mask)`` computed ``slice_size`` (batch x head) rows at a time.

    q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv), mask additive or boolean, broadcastable to
    (B, H, T, S); returns (B, H, T, Dv). Each slice is handed to ``backend`` as a (1, n, T, D) call.
    """
    b, h, t, _ = q.shape
    n = b * h
    if slice_size >= n:
        return backend(q, k, v, mask)
    qf = q.reshape(n, t, q.shape[-1])
    kf = k.reshape(n, k.shape[-2], k.shape[-1])
    vf = v.reshape(n, v.shape[-2], v.shape[-1])
    mf = None
    if mask is not None:
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        # (B|1, H|1, T|1, S) -> (B*H, T|1, S): only the (small) broadcast rows are copied
        mf = mask.expand(b, h, mask.shape[-2], mask.shape[-1]).reshape(n, mask.shape[-2], mask.shape[-1])
    out = None
    for start in range(0, n, slice_size):
        end = min(start + slice_size, n)
        part = backend(qf[None, start:end], kf[None, start:end], vf[None, start:end],
                       mf[None, start:end] if mf is not None else None)[0]
        if out is None:
            out = part.new_empty((n,) + tuple(part.shape[1:]))
        out[start:end] = part
    return out.view(b, h, t, out.shape[-1])


def check_slice_size(slice_size, heads: int) -> None:
    """diffusers' rule: ``None`` or a positive int no larger than the module's head count."""
    if slice_size is None:
        return
    if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
        raise ValueError(f"slice_size must be a positive integer, 'auto', 'max' or None, got {slice_size!r}")
    if slice_size > heads:
        raise ValueError(f"slice_size {slice_size} has to be smaller or equal to {heads}.")


def sliceable_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules with ``set_attention_slice`` below ``model``, in diffusers' (depth-first) order.

    ``model.attention_slice_order`` lists top-level children in diffusers' registration order
    where ours differs (its UNet registers ``up_blocks`` before ``mid_block``), so a list of slice
    sizes means the same modules here as there.
    """
    found = []

    def walk(module):
        if module is not model and hasattr(module, "set_attention_slice") and hasattr(module, "sliceable_head_dim"):
            found.append(module)
        for child in module.children():
            walk(child)

    order = tuple(getattr(model, "attention_slice_order", ()))
    children = list(model.named_children())
    if order:  # the listed children, in that order, where the first of them stands
        first = next((i for i, (name, _) in enumerate(children) if name in order), len(children))
        listed = sorted((c for c in children if c[0] in order), key=lambda c: order.index(c[0]))
        others = [c for c in children if c[0] not in order]
        children = others[:first] + listed + others[first:]
    for _, child in children:
        walk(child)
    return found


def resolve_slice_sizes(slice_size, head_dims: list[int], owner: str) -> list[int | None]:
    """diffusers' expansion of "auto" / "max" / int / list into one slice size per module, checked."""
    if slice_size == "auto":
        sizes = [dim // 2 for dim in head_dims]
    elif slice_size == "max":
        sizes = [1] * len(head_dims)
    elif isinstance(slice_size, (list, tuple)):
        sizes = list(slice_size)
    elif isinstance(slice_size, str):
        raise ValueError(f"slice_size must be 'auto', 'max', an int, a list of ints or None, got {slice_size!r}")
    else:
        sizes = [slice_size] * len(head_dims)
    if len(sizes) != len(head_dims):
        raise ValueError(f"You have provided {len(sizes)}, but {owner} has {len(head_dims)} different attention "
                         f"layers. Make sure to match `len(slice_size)` to be {len(head_dims)}.")
    for size, dim in zip(sizes, head_dims):
        if size is not None and size > dim:
            raise ValueError(f"size {size} has to be smaller or equal to {dim}.")
    # "auto" on a one-head module gives 0 in diffusers too, where it then slices by 0 and fails;
    # here a zero slice means "one head at a time", the only meaningful reading
    return [max(1, s) if isinstance(s, int) and not isinstance(s, bool) and s == 0 else s for s in sizes]


class AttentionSlicingMixin:
    """``set_attention_slice`` for a model, as on diffusers' UNet2DConditionModel."""

    attention_slice_order: tuple[str, ...] = ("down_blocks", "up_blocks", "mid_block")  # diffusers' UNet

    def set_attention_slice(self, slice_size="auto") -> None:
        """Sliced attention in every attention module: "auto", "max", int, list (one per module) or None."""
        modules = sliceable_modules(self)
        sizes = resolve_slice_sizes(slice_size, [m.sliceable_head_dim for m in modules], type(self).__name__)
        for module, size in zip(modules, sizes):
            module.set_attention_slice(size)

    @property
    def attention_slice_sizes(self) -> list[int | None]:
        """Each attention module's slice size (None: unsliced), in module order."""
        return [m.slice_size for m in sliceable_modules(self)]
