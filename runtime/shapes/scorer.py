"""Read a shapes image back into Attributes by geometry (no learned model) and score it against a prompt.

Steps: background = the most common named colour on the border; foreground = pixels far from the
measured background, opened to drop specks, largest connected blob; shape colour = most common
named colour in the blob's core; the blob is then re-cut at the midpoint between the two measured
colours (so blur does not grow or shrink it); position from its bounding-box centre, size from its
bounding-box side, shape from the best IoU against circle/square/triangle templates in that box.
"""
from __future__ import annotations

import numpy as np

from runtime.models.errors import InputError

from .dataset import (COLOURS, PALETTE, POSITION_CENTRES, SIZE_EXTENTS, SHAPES, Attributes,
                      parse_caption, shape_mask)

_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLOURS], np.float32)  # (K, 3)
BORDER = 2                 # border width (pixels at 64x64, scaled) read as background
FOREGROUND_DISTANCE = 90.0  # RGB distance from the background that counts as foreground (pairs are >= 255 apart)
MIN_AREA_FRACTION = 0.004  # smaller blobs are noise: "no shape"
CENTRE_RADIUS = 0.12       # bbox centre within this (fraction of the image) of the middle is "centre"
# Small/large threshold on the bounding-box side: the geometric mean of the two drawn extents.
SIZE_THRESHOLD = float(np.sqrt(SIZE_EXTENTS["small"] * SIZE_EXTENTS["large"]))
ATTRIBUTES = ("shape", "colour", "background", "position", "size")


def as_rgb_array(image) -> np.ndarray:
    """PIL image or (H, W, 3) uint8/float array (float in [0, 1]) -> (H, W, 3) float32 in [0, 255]."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if min(arr.shape[:2]) < 32:
        raise InputError(f"image {arr.shape[1]}x{arr.shape[0]} is too small to score; need >= 32")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
    raise InputError(f"image dtype {arr.dtype} is not uint8 or float")


def nearest_colour_index(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 255] -> (...) index into COLOURS of the nearest palette entry."""
    d = ((pixels[..., None, :] - _PALETTE_RGB) ** 2).sum(-1)  # (..., K)
    return d.argmin(-1)


def _mode_colour(pixels: np.ndarray) -> int:
    counts = np.bincount(nearest_colour_index(pixels).ravel(), minlength=len(COLOURS))
    return int(counts.argmax())


def _shift_and(mask: np.ndarray, op) -> np.ndarray:
    """3x3 erosion (op=np.logical_and) or dilation (op=np.logical_or) with edge replication."""
    p = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    out = p[1:h + 1, 1:w + 1].copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out = op(out, p[dy:dy + h, dx:dx + w])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of a boolean mask.

    Each pixel's label is the flat index of a pixel of its blob; labels take their neighbours'
    minimum and then jump to their label's label (pointer jumping), so few rounds reach the fixpoint.
    """
    if not mask.any():
        return np.zeros_like(mask)
    h, w = mask.shape
    big = h * w
    pad = np.full((h + 2, w + 2), big, np.int64)
    inner = pad[1:-1, 1:-1]                                    # (H, W) view
    inner[...] = np.where(mask, np.arange(h * w).reshape(h, w), big)
    flat = np.append(inner.ravel(), big)                       # label -> its label; [big] = big
    while True:
        spread = np.minimum.reduce([inner, pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]])
        spread = np.where(mask, spread, big)
        flat[:-1] = spread.ravel()
        spread = flat[flat[spread]]                            # two pointer jumps
        if np.array_equal(spread, inner):
            break
        inner[...] = spread
    values, counts = np.unique(inner[mask], return_counts=True)
    return inner == values[counts.argmax()]


def _classify_shape(blob: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """The template (circle, square, triangle) inscribed in the blob's box with the best IoU."""
    y0, y1, x0, x1 = box
    crop = blob[y0:y1, x0:x1]
    h, w = crop.shape
    u = ((np.arange(w) + 0.5) / w * 2.0 - 1.0)[None, :]  # (1, w) in [-1, 1]
    v = ((np.arange(h) + 0.5) / h * 2.0 - 1.0)[:, None]  # (h, 1)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t = shape_mask(shape, u, v)
        iou = (t & crop).sum() / max((t | crop).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _classify_position(cx: float, cy: float) -> str:
    """Nearest drawn position to the bbox centre, with "centre" owning a disc around the middle."""
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_RADIUS:
        return "centre"
    names = [p for p in POSITION_CENTRES if p != "centre"]
    d = [(cx - POSITION_CENTRES[p][0]) ** 2 + (cy - POSITION_CENTRES[p][1]) ** 2 for p in names]
    return names[int(np.argmin(d))]


def read_attributes(image) -> Attributes:
    """What the image shows; fields that cannot be read (e.g. no foreground) are None."""
    rgb = as_rgb_array(image)  # (H, W, 3)
    h, w = rgb.shape[:2]
    b = max(1, round(BORDER * min(h, w) / 64))
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])  # (N, 3)
    bg_index = _mode_colour(border)
    bg_pixels = border[nearest_colour_index(border) == bg_index]
    bg_rgb = np.median(bg_pixels, axis=0)  # the background as drawn, not the palette value
    background = COLOURS[bg_index]

    far = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE  # (H, W)
    opened = _shift_and(_shift_and(far, np.logical_and), np.logical_or)  # drop specks and hairlines
    blob = _largest_component(opened if opened.any() else far)
    if blob.sum() < MIN_AREA_FRACTION * h * w:
        return Attributes(None, None, background, None, None)

    core = _shift_and(blob, np.logical_and)
    fg_pixels = rgb[core if core.sum() >= 4 else blob]  # (M, 3)
    fg_index = _mode_colour(fg_pixels)
    if fg_index == bg_index:  # a blob of a shade of the background colour: no readable shape colour
        return Attributes(None, None, background, None, None)
    fg_rgb = np.median(fg_pixels[nearest_colour_index(fg_pixels) == fg_index], axis=0)

    # Re-cut at the midpoint between the measured colours: projection of each pixel on bg -> fg.
    axis = fg_rgb - bg_rgb
    t = ((rgb - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6)  # (H, W), 0 = bg, 1 = fg
    # Opening picks the blob; the unopened cut inside its neighbourhood keeps corners and apexes.
    cut = t > 0.5
    located = _largest_component(_shift_and(_shift_and(cut, np.logical_and), np.logical_or))
    recut = _largest_component(cut & _shift_and(_shift_and(located, np.logical_or), np.logical_or))
    if recut.sum() >= MIN_AREA_FRACTION * h * w:
        blob = recut
    ys, xs = np.nonzero(blob)
    box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    cx, cy = (box[2] + box[3]) / 2.0 / w, (box[0] + box[1]) / 2.0 / h
    extent = max((box[1] - box[0]) / h, (box[3] - box[2]) / w)
    return Attributes(
        shape=_classify_shape(blob, box),
        colour=COLOURS[fg_index],
        background=background,
        position=_classify_position(cx, cy),
        size="large" if extent >= SIZE_THRESHOLD else "small",
    )


def compare(read: Attributes, expected: Attributes) -> dict:
    """Per-attribute booleans for the attributes `expected` specifies, and their mean as "overall"."""
    result = {}
    for name in ATTRIBUTES:
        want = getattr(expected, name)
        if want is not None:
            result[name] = getattr(read, name) == want
    result["overall"] = sum(result.values()) / max(len(result), 1)
    return result


def score(image, prompt: str | Attributes) -> dict:
    """Score an image against a prompt (a caption string or Attributes): booleans and "overall" in [0, 1]."""
    expected = prompt if isinstance(prompt, Attributes) else parse_caption(prompt)
    return compare(read_attributes(image), expected)


def adherence(images, prompts) -> dict:
    """Fraction correct per attribute and overall over a set of images and their prompts."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images but {len(prompts)} prompts")
    totals: dict[str, list[float]] = {}
    for image, prompt in zip(images, prompts):
        for k, v in score(image, prompt).items():
            totals.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in totals.items()}
