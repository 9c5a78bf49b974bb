"""What one model knows about its LoRA adapters (docs/ARCHITECTURE.md, "LoRA").

A model with adapters carries one ``LoraState`` in its ``__dict__`` (not a submodule, not a buffer:
``state_dict``, ``.to()`` and the optimization passes' tensor snapshots never see adapter tensors).
It holds the adapters by name, which of them are active, whether LoRA is enabled, the hotswap rank,
the per-thread call-time scale, and one ``LoraEntry`` (runtime/lora/entry.py) per adapted layer.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

ATTR = "_lora_state"


class CallScale:
    """The call-time scale (``cross_attention_kwargs={"scale": s}``), per thread: concurrent calls on
    one shared pipeline each see their own."""

    def __init__(self):
        self._local = threading.local()

    def get(self) -> float:
        return getattr(self._local, "scale", 1.0)

    def set(self, value: float) -> None:
        self._local.scale = value

    def __deepcopy__(self, memo):  # a copied model starts with no call in flight
        return CallScale()

    def __reduce__(self):
        return (CallScale, ())


@dataclass
class AdapterInfo:
    """One adapter as a whole: the layers it adapts and how it was loaded."""

    name: str
    paths: list[str]  # module paths in the model, in file order
    source: str = "state dict"


@dataclass
class LoraState:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)  # in load order
    active: list[str] = field(default_factory=list)
    enabled: bool = True
    target_rank: int | None = None  # enable_lora_hotswap: adapters padded to this rank
    entries: dict = field(default_factory=dict)  # module path -> LoraEntry
    scale: CallScale = field(default_factory=CallScale)

    def call_scale(self) -> float:
        return self.scale.get()

    @contextmanager
    def scaled(self, value: float | None):
        """Within the block, this thread's calls scale unfused adapters by ``value`` (None: no change)."""
        if value is None:
            yield
            return
        previous = self.scale.get()
        self.scale.set(float(value))
        try:
            yield
        finally:
            self.scale.set(previous)


def natural_component(model: nn.Module) -> str:
    """The name a model's LoRA keys carry by default: ``text_encoder`` for a CLIP encoder, else ``unet``."""
    return "text_encoder" if hasattr(model, "text_model") else "unet"


def lora_state(model: nn.Module, create: bool = False) -> LoraState | None:
    """The model's LoRA state (created when ``create``), or None when it has none."""
    state = model.__dict__.get(ATTR)
    if state is None and create:
        state = LoraState()
        model.__dict__[ATTR] = state
    return state


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(ATTR, None)


def has_adapters(model) -> bool:
    """Whether ``model`` holds any LoRA adapter (fused or not)."""
    state = model.__dict__.get(ATTR) if isinstance(model, nn.Module) else None
    return bool(state is not None and state.adapters)


@contextmanager
def call_scale(models, value: float | None):
    """This thread's calls of ``models`` (None entries skipped) scale their unfused adapters by ``value``."""
    states = [lora_state(m) for m in models if isinstance(m, nn.Module)]
    states = [s for s in states if s is not None]
    if value is None or not states:
        yield
        return
    previous = [s.scale.get() for s in states]
    for s in states:
        s.scale.set(float(value))
    try:
        yield
    finally:
        for s, p in zip(states, previous):
            s.scale.set(p)
