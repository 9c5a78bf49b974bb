"""torch.compile (inductor) of the denoiser, the VAE decoder and the text encoders.

- Dynamic shapes: sizes are symbolic from the first call, so new resolutions and batch sizes
  reuse the compiled code (a batch of 1 is specialised once by dynamo's 0/1 rule).
- Persistent cache: inductor's on-disk FX-graph and AOTAutograd caches, in ``cache_dir``
  (default ``~/.cache/diffusion-runtime/inductor``), so a second process warms up from disk. The
  directory is set only around calls of the compiled modules (a context this pass owns).
- ``regional=True`` compiles each repeated hook-free block (resnet blocks, feed-forwards,
  attention modules without an output hook, CLIP layers) instead of whole models: identical
  blocks share compiled code, which cuts compile time at a small cost in cross-block fusion.
  ``regional=None`` (the default) picks it when an approximate pass has put Python-side hooks
  into the denoiser (DeepCache, TGATE, ToMe decide per step from the step context, which a
  whole-model graph cannot hold without breaks or recompiles); otherwise whole models compile
  as one graph each (``fullgraph``).

Each compiled module is ``torch.compile(module)`` (public API), called through the module's
``call_with`` slot (runtime/models/call_slot.py): the pipeline keeps its own modules, their forwards
and hooks. Revert clears the slots (the undo log); the eager modules were never changed.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.models.attention import Attention
from runtime.models.call_slot import CallSlot
from runtime.models.errors import OptimizationError

from .base import Pass
from .components import pipeline_device, pipeline_models

DEFAULT_TARGETS = ("unet", "vae", "text_encoder", "text_encoder_2")
REGIONAL_BLOCKS = ("ResnetBlock2D", "FeedForward", "CLIPEncoderLayer")
RECOMPILE_LIMIT = 64
_env_lock = threading.Lock()
_env_users = [0, None]  # (active calls, value to restore)


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "diffusion-runtime", "inductor")


def usable_cache_dir(path: str) -> str:
    """``path``, created if needed; where it cannot be written (read-only volume, a file in the way),
    a temporary folder for this process, with a warning: compiling then starts cold, never crashes."""
    import tempfile
    import warnings

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(suffix=".probe", dir=path)
        os.close(fd)
        os.unlink(probe)
        return path
    except OSError as e:
        fallback = tempfile.mkdtemp(prefix="diffusion-runtime-inductor-")
        warnings.warn(f"compile cache {path} is not writable ({e}); using {fallback} for this process "
                      "(no warm start next time)", RuntimeWarning, stacklevel=3)
        return fallback


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


def _is_region(module: torch.nn.Module) -> bool:
    """A hook-free repeated block: compiled on its own in regional mode."""
    if type(module).__name__ in REGIONAL_BLOCKS:
        return True
    return isinstance(module, Attention) and module.output_hook is None


def _adapted(pipe, targets) -> list[str]:
    """Target components holding LoRA adapters (runtime/lora): freezing would bake them in as constants."""
    from runtime.lora.state import has_adapters

    return [name for name, model in pipeline_models(pipe).items() if name in targets and has_adapters(model)]


def _wrap(compiled, cache_dir: str, inductor_options: dict):
    def call(*args, **kwargs):
        import torch._inductor.config as inductor_config

        # Regional blocks share one code object (Module._call_impl): each block variant is a cache
        # entry of it, more than dynamo's default limit of 8 in an SD UNet plus VAE and CLIP.
        with inductor_cache_dir(cache_dir), inductor_config.patch(inductor_options), \
                torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    call.compiled = compiled  # for tests and introspection
    call.freezing = bool(inductor_options.get("freezing"))  # runtime/lora refuses adapter changes under freezing
    return call


@dataclass(frozen=True)
class CompilePass(Pass):
    name = "compile"
    exact = False  # inductor reorders floating-point work: near-exact
    targets: tuple = DEFAULT_TARGETS
    dynamic: bool = True
    fullgraph: bool = True
    mode: str | None = None
    regional: bool | None = None
    cache_dir: str | None = None
    # Inductor's freezing folds weights into the graph as constants and pre-packs them for oneDNN
    # (CPU): for the bf16 small UNet it measured faster than eager bf16 (bench/RESULTS.md,
    # 'Figures moved from docstrings'). Weights
    # edited in place after the first call are not seen; revert and optimize again after editing.
    # LoRA adapters' tensors would be folded the same way (so swapping or re-weighting them would be
    # ignored): with adapters loaded, None means off, True is refused (supports), and a LoRA change on a
    # model compiled with freezing is a LoraError (runtime/lora/adapters.py).
    freezing: bool | None = None  # None: on for CPU pipelines compiled whole (not regionally), without LoRA
    # Compile a bf16 CPU pipeline too. Off by default: on top of our eager bf16 kernels (attention,
    # packed weights) inductor measured no faster on this CPU, after minutes of compiling (small,
    # 256x256, level 2 compiled and not; measured: bench/RESULTS.md, session 12, 'Level 2 without
    # compile: packed linears, fused GEGLU, compile skipped for bf16 on CPU'), so level 2 skips it there.
    force: bool = False

    def __post_init__(self):
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise OptimizationError(f"compile: targets must be a sequence of component names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    def supports(self, pipe) -> str | None:
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        if self.regional is None and self._regional(pipe) and pipeline_device(pipe).type == "cpu":
            # Measured on the small model, 256x256, 10 steps: level 3 ran faster without compile
            # than with regional compile, and so did bf16 alone (bench/RESULTS.md, 'Figures moved
            # from docstrings'; also 'small, 256x256, 10 PNDM steps, guidance 7.5'). Pass regional=True to compile
            # regionally anyway.
            return ("approximate passes keep per-step Python hooks in the UNet, so only regional "
                    "compilation applies, and on CPU it measured slower than not compiling")
        if not self._modules(pipe):
            return f"none of the components {', '.join(self.targets)} is in this pipeline"
        if self.freezing and _adapted(pipe, self.targets):
            return (f"freezing=True would bake the LoRA adapters of {', '.join(_adapted(pipe, self.targets))} into "
                    "the compiled code as constants; leave freezing at None (off with adapters) or False")
        if not self.force and pipeline_device(pipe).type == "cpu":
            if any(p.dtype == torch.bfloat16 for m in self._modules(pipe) for p in m.parameters()):
                return ("bf16 on CPU: measured no faster than our eager bf16 kernels, after minutes of "
                        "compiling (bench/RESULTS.md); force=True compiles anyway")
            # fp32 on CPU (level 2 where the CPU has no native bf16): at most 1.1x in steady calls, measured
            # over eager fp32 without our kernels, after minutes of compiling in every process, more than
            # ten on the small model on an AVX2-only CPU (bench/RESULTS.md, 'An AVX2-only CPU')
            return ("fp32 on CPU: minutes of compiling in every process for at most 1.1x in steady calls "
                    "(bench/RESULTS.md); force=True compiles anyway")
        return None

    def _regional(self, pipe) -> bool:
        if self.regional is not None:
            return self.regional
        unet = pipeline_models(pipe).get("unet")
        if unet is None:
            return False
        hooked = getattr(unet, "feature_cache", None) is not None or any(
            getattr(m, "token_merge", None) is not None or getattr(m, "output_hook", None) is not None
            for m in unet.modules()
        )
        return hooked

    def _modules(self, pipe) -> list[torch.nn.Module]:
        """The modules whose calls get compiled: whole models, the VAE's decoder, or blocks."""
        regional = self._regional(pipe)
        found = []
        for name, model in pipeline_models(pipe).items():
            if name not in self.targets:
                continue
            root = getattr(model, "decoder", model) if name == "vae" else model
            if regional:
                found += [m for m in root.modules() if _is_region(m)]
            else:
                found.append(root)
        return [m for m in found if isinstance(m, CallSlot)]

    def apply(self, pipe) -> None:
        cache_dir = usable_cache_dir(str(Path(self.cache_dir or default_cache_dir()).expanduser()))
        # Frozen weights are per-instance constants: regional blocks could no longer share code.
        adapted = _adapted(pipe, self.targets)
        default_freezing = pipeline_device(pipe).type == "cpu" and not self._regional(pipe) and not adapted
        freezing = self.freezing if self.freezing is not None else default_freezing
        options = {"freezing": freezing}
        saved = self._state().setdefault("previous", [])
        for module in self._modules(pipe):
            # torch.compile of the module (public API); its compiled call goes into the module's
            # ``call_with`` slot (runtime/models/call_slot.py), so ``pipe.unet`` stays the same object
            compiled = torch.compile(module, dynamic=self.dynamic, fullgraph=self.fullgraph, mode=self.mode)
            self.log().set(module, "call_with", _wrap(compiled, cache_dir, options))
            saved.append(module)
        how = "regionally (hook-free blocks)" if self._regional(pipe) else "whole"
        self._state()["why"] = (
            f"{len(saved)} module(s) compiled {how}, freezing {'on' if freezing else 'off'}"
            + (f" (LoRA adapters on {', '.join(adapted)})" if adapted and not freezing else "")
            + f", cache in {cache_dir}"
        )

    def describe(self) -> str:
        return self._state().get("why", "")
