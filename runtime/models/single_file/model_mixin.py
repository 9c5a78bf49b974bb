"""``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file`` and
``save_single_file`` (diffusers' FromOriginalModelMixin names, plus the reverse direction)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import read_json
from ..errors import ConfigError, InputError
from ..hub import HUB_KWARGS, resolve_folder
from . import components, infer, original_config as ldm_yaml, save
from .checkpoint import read
from .infer import FileType

_KIND = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}


def _kind(cls) -> str:
    for base in cls.__mro__:
        if base.__name__ in _KIND:
            return _KIND[base.__name__]
    raise InputError(f"{cls.__name__}.from_single_file: only UNet2DConditionModel and AutoencoderKL load single files")


def folder_config(config, subfolder: str | None, default_subfolder: str, name: str = "config.json", **hub) -> tuple[dict, str]:
    """A component config from ``config=``: a folder (or hub id) holding it, or a pipeline folder's subfolder."""
    hub = {k: v for k, v in hub.items() if k in HUB_KWARGS and v is not None}
    if subfolder is None:
        local = Path(str(config)).expanduser()
        if local.is_dir() and not (local / name).is_file() and (local / default_subfolder / name).is_file():
            subfolder = default_subfolder
        elif not local.is_dir():
            subfolder = default_subfolder
    folder = resolve_folder(config, subfolder, allow_patterns=["*.json", "*.txt"], **hub)
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"config={config!s}: no {name} in {folder}")
    return read_json(path), str(path)


class FromOriginalModelMixin:
    """Single-file loading and saving for the UNet and the VAE."""

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path_or_dict, config=None, original_config=None, *,
                         subfolder: str | None = None, torch_dtype=None, dtype=None, extract_ema: bool = False,
                         prediction_type: str | None = None, **kwargs):
        """Load this model from an original-layout file (full checkpoint or a bare UNet / VAE file).

        ``config=``: a diffusers folder or hub id (its ``unet/`` or ``vae/`` subfolder, or the folder
        itself); ``original_config=``: the LDM yaml (path or dict); neither: the shipped config of a
        standard type or the config the shapes imply (runtime/models/single_file/infer.py).
        Remaining keywords that are config keys override the config; hub options are honoured.
        """
        from ..modeling import _resolve_dtype

        dtype = _resolve_dtype(dtype, torch_dtype)
        kind = _kind(cls)
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        params = cls._init_parameter_names()
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in params}
        for key in ("low_cpu_mem_usage", "use_safetensors", "variant", "disable_mmap"):
            kwargs.pop(key, None)
        if kwargs:
            import logging

            logging.getLogger(__name__).warning("%s.from_single_file: ignored keyword argument(s): %s",
                                                cls.__name__, ", ".join(sorted(kwargs)))
        if isinstance(pretrained_model_link_or_path_or_dict, dict):
            from .checkpoint import Checkpoint

            ckpt = Checkpoint("<state dict>", pretrained_model_link_or_path_or_dict)
        else:
            ckpt = read(pretrained_model_link_or_path_or_dict, **hub)
        ftype = infer.detect(ckpt.tensors)
        if kind == "unet" and ftype.unet_prefix is None:
            raise ConfigError(f"{ckpt.source}: no UNet in this file (it is a {ftype.name} file)")
        model_config, source = None, None
        if config is not None:
            model_config, source = folder_config(config, subfolder, kind, **hub)
            source = f"config={source}"
        elif original_config is not None:
            configs = ldm_yaml.configs(original_config, ckpt.tensors)
            model_config, source = configs[kind], "original_config"
        else:
            stored = infer.metadata_configs(ckpt.metadata).get(kind)
            if stored:
                model_config, source = stored, "the config stored in the file"
        if kind == "unet":
            return components.load_unet(cls, ckpt, ftype, config=model_config, config_source=source, dtype=dtype,
                                        prediction_type=prediction_type, extract_ema=extract_ema, overrides=overrides)
        return components.load_vae(cls, ckpt, ftype, config=model_config, config_source=source, dtype=dtype,
                                   overrides=overrides)

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write this model in the original layout (.safetensors): a UNet under ``model.diffusion_model.``
        (as in full checkpoints, what A1111 / ComfyUI read), a VAE with bare keys (as VAE files ship)."""
        kind = _kind(type(self))
        tensors = save.unet_original(self) if kind == "unet" else save.vae_original(self)
        return save.write(path, tensors, save.model_configs(**{kind: self}), dtype)
