"""The ``call_with`` slot: a module whose calls another callable runs in its place (docs/ARCHITECTURE.md §3).

The compile pass (runtime/optim/compile.py) compiles a model or a block with ``torch.compile(module)``
(public API) and puts the compiled module's call here; the module itself, its forward and its
hooks are untouched, and clearing the slot (``None``, or deleting the instance attribute) gives the
eager module back. Calls made while torch is tracing (the compiled module tracing this very
module), and calls that re-enter from inside the slot's callable on the same thread (dynamo running
a frame eagerly after a recompile limit, say), run the module's own call.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

_running = threading.local()  # ids of the modules whose slot runs on this thread


class CallSlot(nn.Module):
    """Mixin for modules the compile pass compiles: ``call_with`` (None: the module's own call)."""

    call_with = None

    def __call__(self, *args, **kwargs):
        run = self.__dict__.get("call_with")
        if run is None or torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        active = getattr(_running, "ids", None)
        if active is None:
            active = _running.ids = set()
        key = id(self)
        if key in active:  # re-entered from inside the slot: the module's own call
            return super().__call__(*args, **kwargs)
        active.add(key)
        try:
            return run(*args, **kwargs)
        finally:
            active.discard(key)
