"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free").

High-level UNet features change slowly between adjacent denoising steps. Every ``interval``
steps the whole UNet runs and stores the hidden state that enters its shallow up block; in the
steps between (after the first ``start`` steps, which always run whole), only the shallow branch
runs (down blocks up to ``branch``, then the matching and shallower up blocks) and resumes from the stored deep features. ``layer`` cuts inside block
``branch`` (the paper's finer granularity): the shallow path runs only its layers ``0..layer``
and the up layers that read their skips; ``None`` keeps the whole block. ``interval=1`` runs the
whole UNet every step and changes nothing; ``interval=None`` (the default) picks 2 or 3 by the
call's step count (``resolve_interval``).

Plugs into ``UNet2DConditionModel.feature_cache`` (docs/ARCHITECTURE.md §3). The cache is per thread and the
mode per step comes from the step context the pipeline announces, so concurrent calls on one
pipeline each keep their own features. Any scheduler works: the decision is by loop index.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

from runtime.models.errors import OptimizationError

from .base import Pass
from .components import denoiser


# Measured on the shipped shapes model (48 held-out prompts, DDIM): interval 3 after a quarter of
# the steps keeps adherence at 50 steps but not at 20, where interval 2 does (measured:
# bench/RESULTS.md, session 11, 'Level 3 defaults chosen from measured quality; `optimize(check=...)`').
AUTO_LONG = 30


def resolve_interval(interval: int | None, count: int) -> int:
    """``None`` (auto): 3 for calls of ``AUTO_LONG`` steps or more, 2 for shorter ones."""
    if interval is None:
        return 3 if count >= AUTO_LONG else 2
    return interval


def resolve_start(start: int | float, count: int) -> int:
    """The first step index that may reuse features, for a call of ``count`` steps."""
    if isinstance(start, float):
        return round(start * count)
    return start


class DeepCacheSlot:
    """What the UNet reads from ``feature_cache``: ``branch``, ``layer``, ``mode`` and ``features``."""

    def __init__(self, model, branch: int, interval: int | None, layer: int | None = None, start: int | float = 0):
        self.model, self.branch, self.interval, self.layer = model, branch, interval, layer
        self.start = start
        self._local = threading.local()

    @property
    def mode(self) -> str | None:
        """"store" on full steps, "reuse" between them, None outside a denoising loop."""
        ctx = self.model.step_context
        if ctx is None:
            return None
        interval = resolve_interval(self.interval, ctx.count)
        if interval <= 1:
            return None
        first = resolve_start(self.start, ctx.count)
        # Before ``first`` every step stores (the whole UNet, the same graph as a full step).
        if ctx.index <= first or (ctx.index - first) % interval == 0 or self.features is None:
            return "store"
        return "reuse"

    @property
    def features(self):
        """The stored features; stored on a guided step and read on an unguided one (TGATE dropped
        guidance), the mean of their unconditional and conditional halves."""
        features = getattr(self._local, "features", None)
        ctx = self.model.step_context
        if features is not None and getattr(self._local, "guided", False) and ctx is not None and not ctx.guided:
            uncond, cond = features.chunk(2)
            features = self.features = (uncond + cond) / 2
        return features

    @features.setter
    def features(self, value) -> None:
        ctx = self.model.step_context
        self._local.features = value
        self._local.guided = ctx is not None and ctx.guided


@dataclass(frozen=True)
class DeepCachePass(Pass):
    name = "deepcache"
    exact = False
    # Documented bound at the default: image PSNR against eager at least this, checked by tests on the
    # tiny random pipeline (10 steps); adherence at level 3 is tested on the shipped model.
    psnr_floor_db: ClassVar[float] = 30.0
    interval: int | None = None
    branch: int = 0
    # The default cuts before the shallowest block's first layer: the shallow path is conv_in and the
    # last up layer (faster end to end than layer 0 at interval 3 on small; on the shipped model about
    # the same PSNR at the default interval/start, same adherence; measured: bench/RESULTS.md,
    # session 11, "DeepCache's cut before the first layer (`layer=-1`, now the default); compiled
    # levels on the shipped model").
    # It is what the deepcache package's path at cache_layer_id=0 amounts to (the down layer it runs
    # there feeds nothing). ``0`` cuts after the first layer (the paper's setting for Stable
    # Diffusion): conv_in, one down layer and the last two up layers. ``None`` runs the whole block
    # (well below the package's speed-up on small; measured: bench/RESULTS.md, 'Predictions and what
    # they gave (optimization layer, 2026-11-22)', the DeepCache row).
    layer: int | None = -1
    # Steps before ``start`` (an index, or a fraction of the call's steps when a float) always run
    # the whole UNet: the early steps set layout and colour, and a few-step call has few of them.
    start: int | float = 0.25

    def __post_init__(self):
        if self.interval is not None and (isinstance(self.interval, bool) or not isinstance(self.interval, int)
                                          or self.interval < 1):
            raise OptimizationError(f"deepcache: interval must be None (auto) or an integer >= 1, got {self.interval!r}")
        if not isinstance(self.branch, int) or self.branch < 0:
            raise OptimizationError(f"deepcache: branch must be an integer >= 0, got {self.branch!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < -1):
            raise OptimizationError(f"deepcache: layer must be None or an integer >= -1, got {self.layer!r}")
        st = self.start
        if isinstance(st, bool) or not isinstance(st, (int, float)) or st < 0 or (isinstance(st, float) and st >= 1):
            raise OptimizationError(f"deepcache: start must be a step index >= 0 or a fraction in [0, 1), got {st!r}")

    def supports(self, pipe) -> str | None:
        model = denoiser(pipe)
        if model is None or not hasattr(model, "feature_cache"):
            return "the denoiser has no feature_cache slot (DeepCache needs a staged UNet)"
        blocks = len(model.config.get("down_block_types", ()))
        if self.branch >= blocks:
            return f"branch {self.branch} is out of range for a UNet with {blocks} down blocks"
        if self.layer is not None:
            layers = len(model.down_blocks[self.branch].resnets)
            if self.layer >= layers:
                return f"layer {self.layer} is out of range for down block {self.branch} with {layers} layers"
        return None

    def apply(self, pipe) -> None:
        model = denoiser(pipe)
        self.log().set(model, "feature_cache", DeepCacheSlot(model, self.branch, self.interval, self.layer, self.start))
