"""torch.compile (inductor) of the denoiser, the VAE decoder and the text encoders.

- Dynamic shapes: sizes are symbolic from the first call, so new resolutions and batch sizes
  reuse the compiled code (a batch of 1 is specialised once by dynamo's 0/1 rule).
- Persistent cache: inductor's on-disk FX-graph and AOTAutograd caches, in ``cache_dir``
  (default ``~/.cache/diffusion-runtime/inductor``), so a second process warms up from disk. The
  directory is set only around calls of the compiled modules (a context this pass owns).
- ``regional=True`` compiles each repeated block instead of whole models: identical blocks share
  compiled code, which cuts compile time at a small cost in cross-block fusion.

Revert drops the compiled callables; the eager modules were never changed.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import OptimizationError

from .base import Pass
from .components import pipeline_models

DEFAULT_TARGETS = ("unet", "vae", "text_encoder", "text_encoder_2")
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")
_env_lock = threading.Lock()
_env_users = [0, None]  # (active calls, value to restore)


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "diffusion-runtime", "inductor")


@contextmanager
def inductor_cache_dir(path: str):
    """Point inductor's on-disk caches at ``path`` for the duration of a compiled call."""
    with _env_lock:
        if _env_users[0] == 0:
            _env_users[1] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        _env_users[0] += 1
    try:
        yield
    finally:
        with _env_lock:
            _env_users[0] -= 1
            if _env_users[0] == 0:
                if _env_users[1] is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _env_users[1]


def _wrap(compiled, cache_dir: str):
    def call(*args, **kwargs):
        with inductor_cache_dir(cache_dir):
            return compiled(*args, **kwargs)

    call.compiled = compiled  # for tests and introspection
    return call


@dataclass(frozen=True)
class CompilePass(Pass):
    name = "compile"
    exact = False  # inductor reorders floating-point work: near-exact
    targets: tuple = DEFAULT_TARGETS
    dynamic: bool = True
    fullgraph: bool = True
    mode: str | None = None
    regional: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise OptimizationError(f"compile: targets must be a sequence of component names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    def supports(self, pipe) -> str | None:
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        if not self._modules(pipe):
            return f"none of the components {', '.join(self.targets)} is in this pipeline"
        return None

    def _modules(self, pipe) -> list[torch.nn.Module]:
        """The modules whose calls get compiled: whole models, the VAE's decoder, or blocks."""
        found = []
        for name, model in pipeline_models(pipe).items():
            if name not in self.targets:
                continue
            root = getattr(model, "decoder", model) if name == "vae" else model
            if self.regional:
                found += [m for m in root.modules() if type(m).__name__ in REGIONAL_BLOCKS]
            else:
                found.append(root)
        return found

    def apply(self, pipe) -> None:
        cache_dir = str(Path(self.cache_dir or default_cache_dir()).expanduser())
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        saved = self._state().setdefault("previous", [])
        for module in self._modules(pipe):
            compiled = torch.compile(
                module._call_impl, dynamic=self.dynamic, fullgraph=self.fullgraph, mode=self.mode
            )
            saved.append((module, module._compiled_call_impl))
            module._compiled_call_impl = _wrap(compiled, cache_dir)
        self._state()["why"] = f"{len(saved)} module(s) compiled, cache in {cache_dir}"

    def describe(self) -> str:
        return self._state().get("why", "")

    def revert(self, pipe) -> None:
        for module, previous in reversed(self._state().pop("previous", [])):
            module._compiled_call_impl = previous
