"""DPTImageProcessor: the depth estimator's preprocessing, with transformers' settings and file.

Reads and writes ``preprocessor_config.json`` (``feature_extractor/`` of a depth-to-image
folder). ``processor(images, return_tensors="pt").pixel_values`` is a float32 (B, C, H, W) batch:

1. each image to channels-first numbers: PIL images and uint8 arrays as they are, float arrays
   and tensors in [0, 1] scaled to 0..255 and truncated to uint8 for resizing (then scaled back,
   as transformers' PIL backend does);
2. ``do_resize``: to ``size`` (height, width), or with ``keep_aspect_ratio`` the scale of the side
   that changes least applied to both, each side rounded to a multiple of ``ensure_multiple_of``
   (``round``, ``floor`` if that overshoots a bound); PIL resampling ``resample`` (3 = bicubic);
3. ``do_rescale``: times ``rescale_factor`` (1/255); ``do_normalize``: minus ``image_mean``,
   over ``image_std``; ``do_pad``: centre zero padding to a multiple of ``size_divisor``.

``DPTFeatureExtractor`` (older model_index.json files) is the same class.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .config import read_json
from .errors import InputError
from .files import atomic_write_text

CONFIG_NAME = "preprocessor_config.json"
DEFAULTS = {
    "do_resize": True, "size": {"height": 384, "width": 384}, "resample": 3, "keep_aspect_ratio": False,
    "ensure_multiple_of": 1, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": False, "size_divisor": None,
}


def constrain_to_multiple(value: float, multiple: int, min_value: int = 0, max_value: int | None = None) -> int:
    x = round(value / multiple) * multiple
    if max_value is not None and x > max_value:
        x = math.floor(value / multiple) * multiple
    if x < min_value:
        x = math.ceil(value / multiple) * multiple
    return int(x)


def output_size(height: int, width: int, size: tuple[int, int], keep_aspect_ratio: bool, multiple: int):
    """(height, width) after DPT's resize rule (module docstring, step 2)."""
    scale_h, scale_w = size[0] / height, size[1] / width
    if keep_aspect_ratio:  # the side whose scale is closer to 1 decides
        if abs(1 - scale_w) < abs(1 - scale_h):
            scale_h = scale_w
        else:
            scale_w = scale_h
    return constrain_to_multiple(scale_h * height, multiple), constrain_to_multiple(scale_w * width, multiple)


def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
        raise InputError(f"DPTImageProcessor size {size!r}: expected height and width")
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _as_channels_first(image) -> tuple[np.ndarray, bool]:
    """(C, H, W) array and whether it holds floats in [0, 1] (scaled by 255 for PIL)."""
    if isinstance(image, PIL.Image.Image):
        array = np.asarray(image)
        return (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)), False
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        channels_last = False
    elif isinstance(image, np.ndarray):
        array = image
        channels_last = array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4)
    else:
        raise InputError(f"DPTImageProcessor: expected PIL images, arrays or tensors, got {type(image).__name__}")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim != 3:
        raise InputError(f"DPTImageProcessor: expected one image of 2 or 3 dimensions, got shape {array.shape}")
    if channels_last:
        array = np.moveaxis(array, -1, 0)
    if array.dtype == np.uint8:
        return array, False
    if np.allclose(array, array.astype(int)) and array.min() >= 0 and array.max() <= 255:
        return array, False
    if array.min() < 0 or array.max() > 1:
        raise InputError(f"DPTImageProcessor: float images must lie in [0, 1] (or be whole numbers in 0..255), "
                         f"got [{array.min()}, {array.max()}]")
    return array, True


def _pil_resize(array: np.ndarray, unit: bool, height: int, width: int, resample: int) -> np.ndarray:
    """Resize a (C, H, W) image through PIL's 8 bits; returns (C, h, w) (floats again if ``unit``)."""
    hwc = np.moveaxis(array, 0, -1)
    if unit:
        hwc = hwc.astype(np.float64) * 255
    hwc = hwc.astype(np.uint8)
    image = PIL.Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    out = np.asarray(image.resize((width, height), resample=resample))
    out = out[..., None] if out.ndim == 2 else out
    out = np.moveaxis(out, -1, 0)
    return (out.astype(np.float64) / 255).astype(np.float32) if unit else out


class DPTImageProcessor:
    """transformers' DPTImageProcessor (its PIL backend) for inference: images -> pixel_values."""

    model_input_names = ["pixel_values"]

    def __init__(self, **settings):
        unknown = {k: v for k, v in settings.items() if k not in DEFAULTS}
        self.extra = {k: v for k, v in unknown.items() if k not in ("image_processor_type", "processor_class")}
        values = {**DEFAULTS, **{k: v for k, v in settings.items() if k in DEFAULTS}}
        if isinstance(values["size"], int):
            values["size"] = {"height": values["size"], "width": values["size"]}
        for key, value in values.items():
            setattr(self, key, value)

    # ---- files -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs):
        from .hub import HUB_KWARGS, resolve_file

        kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
        overrides = {k: v for k, v in hub_kwargs.items() if k in DEFAULTS}
        config = read_json(resolve_file(path_or_id, CONFIG_NAME, subfolder=subfolder, **kwargs))
        return cls(**{**config, **overrides})

    def to_dict(self) -> dict:
        return {**self.extra, **{k: getattr(self, k) for k in DEFAULTS}, "image_processor_type": "DPTImageProcessor"}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CONFIG_NAME
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    # ---- preprocessing -----------------------------------------------------------------------
    def __call__(self, images, return_tensors: str | None = "pt", **overrides):
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(self, images, return_tensors: str | None = "pt", **overrides) -> dict:
        unknown = sorted(set(overrides) - set(DEFAULTS))
        if unknown:
            raise InputError(f"DPTImageProcessor: unknown arguments {', '.join(unknown)}")
        s = {k: overrides.get(k, getattr(self, k)) for k in DEFAULTS}
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("DPTImageProcessor: no images")
        out = [self._one(image, s) for image in images]
        shapes = {a.shape for a in out}
        if return_tensors is None:
            return {"pixel_values": out}
        if len(shapes) > 1:
            raise InputError(f"DPTImageProcessor: images of different sizes {sorted(shapes)} cannot be batched")
        if return_tensors not in ("pt", "np"):
            raise InputError(f"DPTImageProcessor: return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        batch = np.stack(out)
        return _Batch(pixel_values=torch.from_numpy(batch) if return_tensors == "pt" else batch)

    @staticmethod
    def _one(image, s: dict) -> np.ndarray:
        array, unit = _as_channels_first(image)
        if s["do_resize"]:
            h, w = output_size(array.shape[-2], array.shape[-1], _size_pair(s["size"]), s["keep_aspect_ratio"],
                               int(s["ensure_multiple_of"] or 1))
            array = _pil_resize(array, unit, h, w, int(s["resample"]))
        if s["do_rescale"]:
            array = (array.astype(np.float64) * s["rescale_factor"]).astype(np.float32)
        if s["do_normalize"]:
            channels = array.shape[0]
            mean = np.asarray(s["image_mean"], dtype=np.float32).reshape(-1)
            std = np.asarray(s["image_std"], dtype=np.float32).reshape(-1)
            mean = np.broadcast_to(mean, (channels,)) if mean.size == 1 else mean
            std = np.broadcast_to(std, (channels,)) if std.size == 1 else std
            array = ((array.astype(np.float32) - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
        if s["do_pad"] and s["size_divisor"]:
            d = int(s["size_divisor"])
            ph = math.ceil(array.shape[-2] / d) * d - array.shape[-2]
            pw = math.ceil(array.shape[-1] / d) * d - array.shape[-1]
            array = np.pad(array, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        return array.astype(np.float32)


class _Batch(dict):
    """transformers' BatchFeature for what we return: keys are also attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


DPTFeatureExtractor = DPTImageProcessor
