"""Bipartite soft matching over a 2-D token grid (Bolya & Hoffman 2023, ToMe for Stable Diffusion).

The algorithm is tomesd's ``bipartite_soft_matching_random2d``: one destination token per
``sx`` x ``sy`` cell (chosen at random, or the top-left one), every other token a source; each
source's most similar destination by cosine similarity; the ``r`` sources with the highest
similarity are averaged into their destinations. Given the same generator it draws the same
random cells and makes the same choices as tomesd (tests/optim/test_token_merge.py compares them).

Why our own: on CPU tomesd's merge and unmerge are ``torch.gather`` / ``scatter`` over
(B, N, C) index tensors expanded along C, which at 1024 tokens of 128 channels took far longer than
ours, about what merging saves in attention (measured: bench/RESULTS.md, session 15, 'Token merging
without tomesd's gathers'). Here each is whole-row copies over the flattened (B*N, C) tokens
(``index_select`` / ``index_add_``), and unmerging is one gather through the inverse map. Knows nothing about models; runtime/optim/tome.py plugs it in.
"""
from __future__ import annotations

from typing import Callable

import torch

TokenFn = Callable[[torch.Tensor], torch.Tensor]


def _cells(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the sources and of the destinations (one per full cell), in the order
    tomesd's (unstable) argsort of "destination first" leaves them, so ties break alike."""
    hsy, wsx = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hsy, wsx, 1, dtype=torch.int64)
    else:  # the same draw as tomesd's, so a seeded generator gives the same cells
        pick = torch.randint(sy * sx, size=(hsy, wsx, 1), device=generator.device, generator=generator).cpu()
    key = torch.zeros(h, w, dtype=torch.int64)  # -1 marks a destination, 0 a source
    cell = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    cell.scatter_(2, pick, -1)
    # (hsy, wsx, sy, sx) -> (hsy, sy, wsx, sx): cell-major to row-major over the covered top-left part
    key[: hsy * sy, : wsx * sx] = cell.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    order = key.reshape(1, -1, 1).argsort(dim=1).flatten()  # destinations first
    n_dst = hsy * wsx
    return order[n_dst:].to(device), order[:n_dst].to(device)


def bipartite_merge(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                    generator: torch.Generator | None = None) -> tuple[TokenFn, TokenFn]:
    """``(merge, unmerge)`` for tokens ``metric`` (B, N, C) on an ``h`` x ``w`` grid, removing ``r``.

    ``generator=None`` takes each cell's top-left token as its destination (tomesd's ``no_rand``).
    ``merge(x)`` (B, N, C') -> (B, N - r, C'): unmerged sources in order of falling similarity,
    then the destinations; ``unmerge(y)`` copies each row back to every token it stands for.
    """
    B, N, _ = metric.shape
    if r <= 0:
        return identity, identity
    device = metric.device
    with torch.no_grad():
        src, dst = _cells(h, w, sx, sy, generator, device)
        n_src, n_dst = src.numel(), dst.numel()
        r = min(r, n_src)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        # cosine similarity of every source to every destination: (B, n_src, n_dst)
        scores = unit.index_select(1, src) @ unit.index_select(1, dst).transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)  # (B, n_src)
        order = best.argsort(dim=-1, descending=True)  # (B, n_src)
        merged_pos, kept_pos = order[:, :r], order[:, r:]  # positions among the sources
        into = best_dst.gather(1, merged_pos)  # (B, r): destination (0..n_dst) of each merged source
        n_kept = n_src - r
        base = torch.arange(B, device=device)[:, None] * N  # (B, 1): first row of each batch item
        kept_rows = (src[kept_pos] + base).flatten()  # (B * n_kept,)
        dst_rows = (dst[None, :] + base).flatten()  # (B * n_dst,)
        merged_rows = (src[merged_pos] + base).flatten()  # (B * r,)
        into_rows = (into + torch.arange(B, device=device)[:, None] * n_dst).flatten()  # into (B * n_dst)
        count = torch.ones(B * n_dst, device=device).index_add_(0, into_rows, torch.ones(B * r, device=device))
        # merged sequence position of each token: (B, N) -> flat rows of the (B * (N - r)) output
        out_base = torch.arange(B, device=device)[:, None] * (N - r)
        inverse = torch.empty(B, N, dtype=torch.int64, device=device)
        inverse.scatter_(1, src[kept_pos], torch.arange(n_kept, device=device).expand(B, n_kept) + out_base)
        inverse.scatter_(1, dst[None, :].expand(B, n_dst), torch.arange(n_dst, device=device).expand(B, n_dst)
                         + n_kept + out_base)
        inverse.scatter_(1, src[merged_pos], into + n_kept + out_base)
        inverse = inverse.flatten()

    def merge(x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        rows = x.reshape(B * N, C)
        kept = rows.index_select(0, kept_rows).view(B, n_kept, C)
        # the mean over each destination and its merged sources, summed in fp32 at least
        acc = torch.promote_types(x.dtype, torch.float32)
        pooled = rows.index_select(0, dst_rows).to(acc)
        pooled.index_add_(0, into_rows, rows.index_select(0, merged_rows).to(acc))
        pooled = pooled.div_(count[:, None]).to(x.dtype).view(B, n_dst, C)
        return torch.cat([kept, pooled], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        C = y.shape[-1]
        return y.reshape(B * (N - r), C).index_select(0, inverse).view(B, N, C)

    return merge, unmerge


def identity(x: torch.Tensor) -> torch.Tensor:
    """The merge and unmerge of a block that merges nothing."""
    return x
