"""The shape probe's results on disk, beside the dispatch cache (shape_probe.py, dispatch.py).

What the probe records follows from the pipeline's class, its networks' classes and configs, the VAE's
memory controls, the image size and our model code, never from the weights or the machine: so a second
``optimize`` of the same checkpoint at the same size (a new process, a service scaling from zero) reads
it back instead of running the meta-device twins. That run costs about a second the first time in a
process, since torch's meta kernels import torch._dynamo on first use (bench/RESULTS.md, 'Cold start on a
quiet machine'). The key holds a hash of runtime/models/*.py and shape_probe.py: edited model code
probes again. One JSON file per key, ``probe-<hash>.json``, written atomically; a file that cannot be
read as one of ours is ignored with a warning and written again; an unwritable folder keeps the
result for the process only (the dispatch cache has warned about the folder already).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from .components import pipeline_models
from .shape_probe import KINDS, Calls

FORMAT = 1

_sources: list[str] = []


def _sources_hash() -> str:
    if not _sources:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for f in sorted((root / "models").glob("*.py")) + [root / "optim" / "shape_probe.py"]:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        _sources.append(h.hexdigest()[:16])
    return _sources[0]


def probe_key(pipe, size: tuple[int, int]) -> str:
    """A hash of everything the probe's result follows from (see the module docstring)."""
    networks = {}
    for name, model in sorted(pipeline_models(pipe).items()):
        flags = {f: bool(getattr(model, f)) for f in ("use_tiling", "use_slicing") if hasattr(model, f)}
        networks[name] = [type(model).__qualname__, dict(model.config), flags]
    text = json.dumps({"format": FORMAT, "pipeline": type(pipe).__qualname__, "size": list(size),
                       "networks": networks, "sources": _sources_hash()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def to_json(calls: Calls) -> dict:
    return {"format": FORMAT, "size": list(calls.size), "probed": list(calls.probed), "failed": dict(calls.failed),
            "calls": {kind: [[model, name, [_lists(c) for c in seen]] for (model, name), seen in calls.calls[kind].items()]
                      for kind in KINDS}}


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def from_json(data: dict) -> Calls:
    if data.get("format") != FORMAT or set(data.get("calls", {})) != set(KINDS):
        raise ValueError("not a probe cache file of this format")
    calls = Calls(tuple(data["size"]), probed=[str(n) for n in data["probed"]],
                  failed={str(k): str(v) for k, v in data["failed"].items()})
    for kind in KINDS:
        for model, name, seen in data["calls"][kind]:
            calls.calls[kind][(str(model), str(name))] = [_tuples(c) for c in seen]
    return calls


def path_for(directory: Path, key: str) -> Path:
    return Path(directory) / f"probe-{key}.json"


def load(directory: Path | None, key: str) -> Calls | None:
    """The cached result for ``key``, or None (nothing cached, no folder, or an unreadable file: warned)."""
    if directory is None:
        return None
    path = path_for(directory, key)
    if not path.exists():
        return None
    try:
        return from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"shape probe cache file {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                      "probing again (the file is rewritten)", RuntimeWarning, stacklevel=3)
        return None


def store(directory: Path | None, key: str, calls: Calls) -> None:
    """Write ``calls`` for ``key`` (a probe that failed for some network is not kept: it probes again)."""
    if directory is None or calls.failed:
        return
    from runtime.models.files import atomic_write_text

    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path_for(directory, key), json.dumps(to_json(calls), sort_keys=True))
    except OSError:
        pass  # an unwritable folder: the dispatch cache warns about it once
