"""Procedural captioned shapes: one flat shape on a flat background, drawn on the fly from a seed.

The embedded model is trained on these images and the scorer reads them back, so the geometry
here (positions, sizes, palette) is the single source of truth for both.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from runtime.models.errors import InputError

SHAPES = ("circle", "square", "triangle")
# The eight corners of the RGB cube: every pair is at least 255 apart, so the nearest named colour
# survives the blur and colour drift of a small generator.
PALETTE = {
    "black": (0, 0, 0),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOURS = tuple(PALETTE)
POSITIONS = ("centre", "left", "right", "top", "bottom")
SIZES = ("small", "large")

# Shape centre as (x, y) fractions of the image; the side positions sit far enough in that a
# large shape with jitter never leaves the canvas.
POSITION_CENTRES = {
    "centre": (0.5, 0.5),
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
}
# Bounding-box side as a fraction of the image (circle diameter, square side, triangle base/height).
SIZE_EXTENTS = {"small": 0.2, "large": 0.42}
POSITION_JITTER = 0.02   # +- fraction of the image, uniform
SIZE_JITTER = 0.1        # +- relative, uniform
SUPERSAMPLE = 4          # anti-aliasing: coverage from a 4x4 grid per pixel

HELD_OUT_SEED = 6
HELD_OUT_FRACTION = 0.1

# Caption grammar (the one place it is defined):
#   "a {size} {colour} {shape} on a {background} background, {position phrase}"
# with the position phrases below. A short form drops size and position:
#   "a {colour} {shape} on a {background} background"
POSITION_PHRASES = {
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_POSITION_WORDS = {"centre": "centre", "center": "centre", "middle": "centre",
                   "left": "left", "right": "right", "top": "top", "bottom": "bottom"}
_CAPTION_RE = re.compile(
    r"^(?:an?\s+)?(?:(?P<size>\w+)\s+)?(?P<colour>\w+)\s+(?P<shape>\w+)\s+on\s+(?:an?\s+)?"
    r"(?P<background>\w+)\s+background\s*(?:,?\s*(?:in|on|at)\s+(?:the\s+)?(?P<position>\w+))?$")


@dataclass(frozen=True)
class Attributes:
    """What one image shows; a field is None where it is unspecified (prompt) or unreadable (image)."""

    shape: str | None
    colour: str | None
    background: str | None
    position: str | None = None
    size: str | None = None

    def triple(self) -> tuple[str | None, str | None, str | None]:
        return (self.shape, self.colour, self.background)


def caption(attrs: Attributes, short: bool = False) -> str:
    """The caption for `attrs`; `short` drops size and position (also used when they are None)."""
    if attrs.shape is None or attrs.colour is None or attrs.background is None:
        raise InputError(f"caption needs shape, colour and background; got {attrs}")
    if short or attrs.size is None or attrs.position is None:
        return f"a {attrs.colour} {attrs.shape} on a {attrs.background} background"
    return (f"a {attrs.size} {attrs.colour} {attrs.shape} on a {attrs.background} background, "
            f"{POSITION_PHRASES[attrs.position]}")


def parse_caption(text: str) -> Attributes:
    """Invert `caption` (also "center"/"middle", any case, trailing period); raise InputError otherwise."""
    clean = " ".join(text.lower().strip().rstrip(".!").split())
    match = _CAPTION_RE.match(clean)
    if match is None:
        raise InputError(f"prompt {text!r} does not follow 'a [size] <colour> <shape> on a "
                         f"<colour> background[, on the <position>]'")
    size, colour, shape = match["size"], match["colour"], match["shape"]
    background, position = match["background"], match["position"]
    if size is not None and size not in SIZES:
        raise InputError(f"prompt {text!r}: size {size!r} is not one of {SIZES}")
    for name, value, allowed in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                 ("background", background, COLOURS)):
        if value not in allowed:
            raise InputError(f"prompt {text!r}: {name} {value!r} is not one of {allowed}")
    if position is not None:
        if position not in _POSITION_WORDS:
            raise InputError(f"prompt {text!r}: position {position!r} is not one of {POSITIONS}")
        position = _POSITION_WORDS[position]
    return Attributes(shape, colour, background, position, size)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in box coordinates u, v in [-1, 1] (v down): the shape inscribed in the box."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(attrs: Attributes, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `attrs` as an (size, size, 3) uint8 image; `rng` jitters position and size, None draws the mean."""
    if None in (attrs.shape, attrs.colour, attrs.background, attrs.position, attrs.size):
        raise InputError(f"render needs every attribute; got {attrs}")
    cx, cy = POSITION_CENTRES[attrs.position]
    extent = SIZE_EXTENTS[attrs.size]
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        extent *= 1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    n = size * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n                   # sample centres in [0, 1]
    u = (grid[None, :] - cx) / (extent / 2.0)         # (1, n) box coordinates
    v = (grid[:, None] - cy) / (extent / 2.0)         # (n, 1)
    inside = shape_mask(attrs.shape, u, v).astype(np.float32)  # (n, n)
    alpha = inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))  # (size, size)
    fg = np.asarray(PALETTE[attrs.colour], np.float32)
    bg = np.asarray(PALETTE[attrs.background], np.float32)
    image = bg + alpha[..., None] * (fg - bg)          # (size, size, 3)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def to_pil(image: np.ndarray):
    """An (H, W, 3) uint8 array as a PIL image."""
    from PIL import Image

    return Image.fromarray(image, mode="RGB")


def all_triples() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


def _held_out_triples(seed: int = HELD_OUT_SEED) -> frozenset[tuple[str, str, str]]:
    """~10% of the triples, picked in hash order, never holding out every triple of one attribute pair."""
    def key(t: tuple[str, str, str]) -> str:
        return hashlib.sha256(f"{seed}|{'|'.join(t)}".encode()).hexdigest()

    triples = all_triples()
    target = round(HELD_OUT_FRACTION * len(triples))
    pair_totals: dict[tuple, int] = {}
    for t in triples:
        for p in _pairs(t):
            pair_totals[p] = pair_totals.get(p, 0) + 1
    pair_held: dict[tuple, int] = {}
    chosen: set[tuple[str, str, str]] = set()
    for t in sorted(triples, key=key):
        if len(chosen) == target:
            break
        # Keep every (shape, colour), (shape, background), (colour, background) pair in training.
        if any(pair_held.get(p, 0) + 1 >= pair_totals[p] for p in _pairs(t)):
            continue
        chosen.add(t)
        for p in _pairs(t):
            pair_held[p] = pair_held.get(p, 0) + 1
    return frozenset(chosen)


def _pairs(t: tuple[str, str, str]) -> tuple[tuple, ...]:
    s, c, b = t
    return (("sc", s, c), ("sb", s, b), ("cb", c, b))


HELD_OUT_TRIPLES = _held_out_triples()


def is_held_out(attrs: Attributes) -> bool:
    """True when the (shape, colour, background) triple is reserved for evaluation."""
    return attrs.triple() in HELD_OUT_TRIPLES


def training_combinations() -> list[Attributes]:
    """Every full attribute combination training may draw, in a fixed order."""
    return [Attributes(s, c, b, p, z) for (s, c, b) in all_triples() if (s, c, b) not in HELD_OUT_TRIPLES
            for p in POSITIONS for z in SIZES]


def held_out_combinations() -> list[Attributes]:
    """Every full attribute combination training never sees, in a fixed order."""
    return [Attributes(s, c, b, p, z) for (s, c, b) in all_triples() if (s, c, b) in HELD_OUT_TRIPLES
            for p in POSITIONS for z in SIZES]


def held_out_attributes(n: int, seed: int = 0) -> list[Attributes]:
    """`n` held-out combinations: a seeded shuffle of all of them, cycled when n exceeds their count."""
    combos = held_out_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [combos[order[i % len(combos)]] for i in range(n)]


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """Captions of `held_out_attributes(n, seed)`: the evaluation prompts."""
    return [caption(a) for a in held_out_attributes(n, seed)]


def sample(n: int, seed: int, size: int = 64, split: str = "train",
           short_fraction: float = 0.0) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """`n` images (n, size, size, 3) uint8 with captions and attributes, reproducible from `seed`.

    split "train" draws training combinations, "held_out" the reserved ones; `short_fraction` of
    the captions use the short form (no size or position).
    """
    if split == "train":
        combos = training_combinations()
    elif split == "held_out":
        combos = held_out_combinations()
    else:
        raise InputError(f"split must be 'train' or 'held_out', got {split!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    captions, attrs = [], []
    for i in range(n):
        a = combos[rng.integers(len(combos))]
        images[i] = render(a, size, rng)
        captions.append(caption(a, short=bool(rng.random() < short_fraction)))
        attrs.append(a)
    return images, captions, attrs


def batches(batch_size: int, seed: int, size: int = 64,
            short_fraction: float = 0.0) -> Iterator[tuple[np.ndarray, list[str], list[Attributes]]]:
    """An endless stream of training batches; batch k is `sample(batch_size, hash(seed, k))`."""
    for k in itertools.count():
        yield sample(batch_size, seed * 1_000_003 + k, size, "train", short_fraction)
