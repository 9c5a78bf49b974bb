"""One undo log for everything a pass changes (docs/ARCHITECTURE.md §4).

A pass never writes its own restore code: ``apply`` records each change through its log
(``Pass.log()``), and ``Pass.revert`` replays the log backwards. The recorders:

- ``set(obj, attr, value)``: an attribute (a model's slot); undone by putting back the instance
  value it replaced, or by deleting the instance attribute when there was none (the class default
  shows again, so the module's ``__dict__`` is what it was).
- ``plug(layer, name, impl)``: an entry in a layer's compute chain (runtime/models/layers.py), at
  the place ``ORDER`` gives it; undone by removing that entry, whatever else was plugged since.
- ``tensors(module, convert)``: the module's parameters' data and buffers, before a conversion that
  swaps them (dtype, memory format; ``convert`` runs it); undone by putting the same tensors back
  (runtime/optim/snapshot.py). After ``convert`` the originals the module no longer holds leave
  memory (left to their checkpoint file, or spilled to disk) until the revert.
- ``hook(handle)``: a registered torch hook; undone by removing it.
- ``call(what, undo)``: anything else that has an exact inverse (unfusing projections), by name.

Replaying runs every entry even when one fails; the entries that failed stay in the log and a
``RevertError`` names each of them with its error, so nothing is silently left half-restored.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from runtime.models.errors import RuntimeErrorBase

from .snapshot import TensorSnapshot

# Who runs first when several passes plug into one layer's compute chain: outermost first. An
# outer entry sees the call first and hands what it does not take to the next one; the layer's
# own operator (F.conv2d / F.linear) is always last. The one place this order is decided.
ORDER: tuple[str, ...] = ("lora", "winograd", "prepack")

_MISSING = object()


class RevertError(RuntimeErrorBase, RuntimeError):
    """A revert could not restore everything; ``failed`` lists what it could not restore."""

    def __init__(self, owner: str, failed: list[tuple[str, BaseException]]):
        self.owner, self.failed = owner, failed
        lines = "; ".join(f"{what} ({type(err).__name__}: {err})" for what, err in failed)
        super().__init__(f"{owner}: revert could not restore {len(failed)} change(s): {lines}")


def _label(obj: Any) -> str:
    return type(obj).__name__


def chain_with(chain: tuple, name: str, impl: Callable) -> tuple:
    """``chain`` with ``(name, impl)`` at its place in ``ORDER``; a name already there is an error."""
    if name not in ORDER:
        raise ValueError(f"compute chain entry {name!r} has no place in ORDER ({', '.join(ORDER)})")
    if any(n == name for n, _ in chain):
        raise ValueError(f"compute chain already has a {name!r} entry")
    entries = [*chain, (name, impl)]
    return tuple(sorted(entries, key=lambda e: ORDER.index(e[0])))


def chain_without(chain: tuple, name: str) -> tuple:
    if not any(n == name for n, _ in chain):
        raise LookupError(f"no {name!r} entry in the compute chain (entries: {[n for n, _ in chain]})")
    return tuple(e for e in chain if e[0] != name)


def entry(layer: nn.Module, name: str):
    """The implementation plugged into ``layer``'s compute chain as ``name``, or None."""
    for n, impl in getattr(layer, "compute", ()):
        if n == name:
            return impl
    return None


class UndoLog:
    """What one pass changed, in order; ``replay()`` undoes it last first."""

    def __init__(self, owner: str = "pass"):
        self.owner = owner
        self.entries: list[tuple[str, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def call(self, what: str, undo: Callable[[], None]) -> None:
        """Record a change made by the caller, with its exact inverse."""
        self.entries.append((what, undo))

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """``setattr(obj, attr, value)``, recorded."""
        what = f"{_label(obj)}.{attr}"
        if isinstance(obj, nn.Module) and any(attr in d for d in (obj._parameters, obj._buffers, obj._modules)):
            previous = getattr(obj, attr)
        else:
            previous = getattr(obj, "__dict__", {}).get(attr, _MISSING)
        setattr(obj, attr, value)
        if previous is _MISSING:
            self.entries.append((what, lambda: delattr(obj, attr)))
        else:
            self.entries.append((what, lambda: setattr(obj, attr, previous)))

    def plug(self, layer: nn.Module, name: str, impl: Callable) -> None:
        """Put ``impl`` into ``layer``'s compute chain as ``name`` (its place: ``ORDER``), recorded."""
        layer.compute = chain_with(layer.compute, name, impl)

        def unplug():
            layer.compute = chain_without(layer.compute, name)

        self.entries.append((f"{_label(layer)}.compute[{name!r}]", unplug))

    def tensors(self, module: nn.Module, convert: Callable[[], Any] | None = None) -> TensorSnapshot:
        """Keep ``module``'s parameter data and buffers, recorded; then ``convert()`` (the conversion,
        e.g. ``lambda: module.to(dtype)``) and release the originals it replaced from memory
        (``TensorSnapshot.release``: left to their checkpoint file or spilled, read back on replay).
        Without ``convert`` the caller converts afterwards and the originals stay in memory."""
        snapshot = TensorSnapshot.take(module)
        self.entries.append((f"{_label(module)} tensors", snapshot.restore))
        if convert is not None:
            convert()
            snapshot.release(f"{self.owner}: {_label(module)}")
        return snapshot

    def snapshots(self) -> list[TensorSnapshot]:
        """The tensor snapshots this log holds (what ``tensors`` recorded), oldest first."""
        return [u.__self__ for _, u in self.entries if isinstance(getattr(u, "__self__", None), TensorSnapshot)]

    def hook(self, handle, what: str = "hook") -> None:
        """A hook handle (``register_forward_pre_hook`` & co.), removed on replay."""
        self.entries.append((what, handle.remove))

    def replay(self) -> None:
        """Undo every entry, last first; raise ``RevertError`` naming those that failed."""
        entries, self.entries = self.entries, []
        failed: list[tuple[str, BaseException]] = []
        kept = []
        for what, undo in reversed(entries):
            try:
                undo()
            except Exception as err:  # keep going: restore all that can be restored
                failed.append((what, err))
                kept.append((what, undo))
        if failed:
            self.entries = list(reversed(kept))
            raise RevertError(self.owner, failed) from failed[0][1]
