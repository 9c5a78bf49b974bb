"""Writing the original layout back (``save_single_file``): what A1111 / ComfyUI / diffusers'
``from_single_file`` read. The configs go into the safetensors metadata
(``diffusion_runtime.config``) so our own loader rebuilds the exact model (attention heads and
the rest of what shapes cannot tell); other loaders ignore it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..files import atomic_file
from ..errors import InputError
from ..safetensors_io import prepare_for_save
from . import clip_keys, open_clip_keys, unet_keys, vae_keys
from .infer import METADATA_KEY


def _config(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_") or k == "_class_name"} | {
        "_class_name": type(model).__name__}


def unet_original(unet, prefix: str = unet_keys.PREFIX) -> dict[str, torch.Tensor]:
    lpb = unet.config.layers_per_block
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    return {prefix + k: v for k, v in unet_keys.to_original(unet._state_dict_for_save(), int(lpb)).items()}


def vae_original(vae, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in vae_keys.to_original(vae._state_dict_for_save()).items()}


def text_original(encoder, layout: str, prefix: str, pad_layer: bool) -> dict[str, torch.Tensor]:
    sd = encoder._state_dict_for_save()
    if layout == "clip":
        return {prefix + k: v for k, v in clip_keys.to_original(sd).items()}
    return {prefix + k: v for k, v in open_clip_keys.to_original(sd, pad_layer).items()}


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], configs: dict, dtype: torch.dtype | None = None) -> Path:
    """Write one safetensors file atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"save_single_file: {path}: only .safetensors is written (pickles are unsafe to share)")
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = prepare_for_save(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(configs, sort_keys=True)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def model_configs(**models) -> dict:
    return {name: _config(m) for name, m in models.items() if m is not None and hasattr(m, "config")}
