"""The level table (docs/ARCHITECTURE.md §4) and the plan ``optimize`` builds from a level and overrides."""
from __future__ import annotations

from typing import Any

from runtime.models.errors import OptimizationError

from .attention import AttentionPass
from .base import Pass
from .compile import CompilePass
from .prepack import PrepackPass
from .deepcache import DeepCachePass
from .fused_qkv import FusedQKVPass
from .geglu import GEGLUPass
from .group_norm import GroupNormPass
from .memory_format import MemoryFormatPass
from .precision import PrecisionPass
from .tgate import TGatePass
from .tome import ToMePass
from .upsample import UpsamplePass
from .winograd import WinogradPass

# Every pass, in the order they are applied (compile last: it traces what the others set up). The passes
# that measure which implementation runs (attention, geglu, winograd; dispatch.py) come after precision
# and prepack, so they time the dtype and the alternative the pipeline will run.
PASSES: dict[str, type[Pass]] = {
    cls.name: cls
    for cls in (FusedQKVPass, GroupNormPass, UpsamplePass, MemoryFormatPass, PrecisionPass, PrepackPass,
                AttentionPass, GEGLUPass, WinogradPass, ToMePass, TGatePass, DeepCachePass, CompilePass)
}

# Which passes each level adds on top of the level below.
LEVEL_ADDS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("attention", "fused_qkv", "geglu", "group_norm", "upsample", "memory_format", "winograd"),
    2: ("precision", "prepack", "compile"),
    3: ("deepcache", "tgate", "tome"),
}


def passes_for_level(level: int) -> list[str]:
    if level not in LEVEL_ADDS:
        raise OptimizationError(f"optimize: level must be one of {sorted(LEVEL_ADDS)}, got {level!r}")
    names = [n for lv in sorted(LEVEL_ADDS) if lv <= level for n in LEVEL_ADDS[lv]]
    return [n for n in names if n in PASSES]


def build_plan(level: int, overrides: dict[str, Any]) -> list[Pass]:
    """Passes to apply, in order: the level's passes, then overrides (False off, True on, dict retune)."""
    chosen: dict[str, dict] = {name: {} for name in passes_for_level(level)}
    for name, value in overrides.items():
        if name not in PASSES:
            raise OptimizationError(f"optimize: unknown pass {name!r}; valid passes: {', '.join(PASSES)}")
        if value is False or value is None:
            chosen.pop(name, None)
        elif value is True:
            chosen.setdefault(name, {})
        elif isinstance(value, dict):
            chosen[name] = dict(value)
        else:
            raise OptimizationError(
                f"optimize: override for {name!r} must be True, False or a dict of settings, got {value!r}"
            )
    return [PASSES[name].with_settings(chosen[name]) for name in PASSES if name in chosen]
