"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion").

Before a transformer block's self-attention, ``ratio`` of the tokens are merged into similar ones
(bipartite soft matching over a 2-D grid, with one destination token per ``sx`` x ``sy`` cell);
after it they are copied back out. Only blocks whose token grid is downsampled at most
``max_downsample`` times from the latent are merged (the high-resolution ones, where attention
costs most). The matching algorithm is the ``tomesd`` package's, run by runtime/optim/token_merge.py
(row copies, faster than tomesd's gathers on CPU, same choices; measured: bench/RESULTS.md, session 15,
'Token merging without tomesd's gathers'); this file plugs it into the
transformer blocks' ``token_merge`` slot (docs/ARCHITECTURE.md §3) and never copies a forward.

Randomness (which token of each cell is the destination) comes from a generator seeded with
``seed`` at the start of each call, per thread: results are reproducible and concurrent calls do
not disturb each other. ``ratio=0`` changes nothing.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

from runtime.models.errors import OptimizationError

from .base import Pass
from .components import denoiser
from .token_merge import bipartite_merge, identity


class _MergeHook:
    """The ``token_merge`` callable of one transformer block."""

    def __init__(self, cfg: "ToMePass", state: threading.local, model):
        self.cfg, self.state, self.model = cfg, state, model

    def _generator(self) -> torch.Generator:
        """This thread's generator, seeded afresh at step 0 of each call."""
        ctx = self.model.step_context
        gen = getattr(self.state, "generator", None)
        fresh_call = ctx is not None and ctx.index == 0 and getattr(self.state, "seeded_for", None) is not ctx
        if gen is None or fresh_call:
            gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
            self.state.generator, self.state.seeded_for = gen, ctx
        return gen

    def __call__(self, x: torch.Tensor):
        cfg = self.cfg
        h, w = self.state.latent_hw
        downsample = int(math.ceil(math.sqrt(h * w // x.shape[1])))
        if downsample > cfg.max_downsample or cfg.ratio <= 0:
            return (identity,) * 6
        gh, gw = int(math.ceil(h / downsample)), int(math.ceil(w / downsample))
        # Odd batches cannot keep cond/uncond halves aligned under random cells (tomesd's rule).
        no_rand = (not cfg.use_rand) or x.shape[0] % 2 == 1
        merge, unmerge = bipartite_merge(
            x, gw, gh, cfg.sx, cfg.sy, int(x.shape[1] * cfg.ratio), generator=None if no_rand else self._generator(),
        )
        attn = (merge, unmerge)
        cross = attn if cfg.merge_crossattn else (identity, identity)
        mlp = attn if cfg.merge_mlp else (identity, identity)
        return attn[0], attn[1], cross[0], cross[1], mlp[0], mlp[1]


@dataclass(frozen=True)
class ToMePass(Pass):
    name = "tome"
    exact = False
    # Documented bound at ratio 0.5: image PSNR against eager at least this, checked by tests on
    # the tiny random pipeline (10 steps, max_downsample 2; what it measured there: bench/RESULTS.md,
    # 'Figures moved from docstrings').
    psnr_floor_db: ClassVar[float] = 30.0
    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise OptimizationError(f"tome: ratio must be in [0, 1), got {self.ratio!r}")
        if self.max_downsample not in (1, 2, 4, 8):
            raise OptimizationError(f"tome: max_downsample must be 1, 2, 4 or 8, got {self.max_downsample!r}")

    def _blocks(self, pipe):
        model = denoiser(pipe)
        if model is None:
            return None, []
        return model, [m for m in model.modules() if hasattr(m, "token_merge")]

    def supports(self, pipe) -> str | None:
        model, blocks = self._blocks(pipe)
        if model is None:
            return "no denoiser (unet) in this pipeline"
        if not blocks:
            return "the denoiser has no transformer blocks with a token_merge slot"
        return None

    def apply(self, pipe) -> None:
        model, blocks = self._blocks(pipe)
        state = threading.local()

        def record_size(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            state.latent_hw = tuple(sample.shape[-2:])

        log = self.log()
        log.hook(model.register_forward_pre_hook(record_size, with_kwargs=True), "UNet forward pre-hook (latent size)")
        hook = _MergeHook(self, state, model)
        for b in blocks:
            log.set(b, "token_merge", hook)
