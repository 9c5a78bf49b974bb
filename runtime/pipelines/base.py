"""DiffusionPipeline: components from model_index.json, built with our classes; save, move, share.

A pipeline class lists its component names; ``from_pretrained`` reads model_index.json, maps
each [library, class] entry to our class through registry.py, and loads it from its subfolder.
``save_pretrained`` writes the same layout back, so diffusers loads what we save.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.models.config import DIFFUSERS_COMPAT_VERSION, FrozenConfig, read_json
from runtime.models.errors import ConfigError, InputError
from runtime.models.files import atomic_write_text
from runtime.models.hub import HUB_KWARGS, resolve_file

from .registry import UNSUPPORTED_OPTIONAL, library_of, model_class, pipeline_classes

logger = logging.getLogger(__name__)

LOAD_KWARGS = ("variant", "use_safetensors", "check_finite")


def _call_with_accepted(fn, *args, **kwargs):
    """Call ``fn`` with only the keyword arguments its signature accepts (None values dropped)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = {k: v for k, v in kwargs.items() if v is not None}
    else:
        accepted = {k: v for k, v in kwargs.items() if k in params and v is not None}
    return fn(*args, **accepted)


def _parse_to_args(args, device, dtype):
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            device = arg
        else:
            raise InputError(f"Pipeline.to: expected a device or a dtype, got {arg!r}")
    return device, dtype


class DiffusionPipeline:
    """Base of every pipeline; ``DiffusionPipeline.from_pretrained`` returns the folder's class."""

    component_names: tuple[str, ...] = ()
    optional_components: tuple[str, ...] = ()
    model_cpu_offload_seq: str | None = None  # the order networks run in ("text_encoder->unet->vae")
    _exclude_from_cpu_offload: tuple[str, ...] = ()
    hf_device_map = None
    config_defaults: dict = {}  # non-component keys of model_index.json (requires_safety_checker...)

    def __init__(self, *args, **kwargs):
        names = self.component_names
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} components, got {len(args)}")
        components = dict(zip(names, args))
        for name in names:
            if name in kwargs:
                components[name] = kwargs.pop(name)
        config = dict(self.config_defaults)
        for key in list(kwargs):
            if key in config:
                config[key] = kwargs.pop(key)
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unexpected arguments {', '.join(sorted(kwargs))}")
        missing = [n for n in names if components.get(n) is None and n not in self.optional_components]
        if missing:
            raise InputError(f"{type(self).__name__} needs the components {', '.join(missing)}")
        for name in names:
            setattr(self, name, components.get(name))
        self._config = FrozenConfig({"_class_name": type(self).__name__, **config})
        self._progress_bar_config: dict = {}
        self.name_or_path: str | None = None

    # ---- what the pipeline holds ---------------------------------------------------------
    @property
    def config(self) -> FrozenConfig:
        return self._config

    @property
    def components(self) -> dict:
        return {name: getattr(self, name) for name in self.component_names}

    def _modules(self) -> list[nn.Module]:
        return [c for c in self.components.values() if isinstance(c, nn.Module)]

    @property
    def _execution_device(self) -> torch.device:
        """Where the networks run: the offload device when CPU offload is on, else the pipeline's."""
        offload = self.__dict__.get("_offload_device")
        return offload if offload is not None else self.device

    @property
    def device(self) -> torch.device:
        for module in self._modules():
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        unet = getattr(self, "unet", None)
        for module in ([unet] if isinstance(unet, nn.Module) else []) + self._modules():
            for p in module.parameters():
                return p.dtype
        return torch.float32

    def to(self, *args, device=None, dtype=None, silence_dtype_warnings: bool = False):
        """Move every module component to ``device`` and/or cast it to ``dtype``; returns self."""
        device, dtype = _parse_to_args(args, device, dtype)
        if device is not None and self.__dict__.get("_offload") is not None and torch.device(device).type != "cpu":
            logger.warning("%s.to(%s) with CPU offload on: the offload hooks stay and move the networks back; "
                           "call remove_all_hooks() first to keep them there", type(self).__name__, device)
        for module in self._modules():
            module.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        parts = [f"  {n}: {type(c).__name__ if c is not None else None}" for n, c in self.components.items()]
        return f"{type(self).__name__}(\n" + "\n".join(parts) + "\n)"

    # ---- memory controls (diffusers' names) ------------------------------------------------
    def enable_attention_slicing(self, slice_size: str | int | list | None = "auto") -> None:
        """Sliced attention in every network that has ``set_attention_slice`` (the UNet): "auto" (half
        the heads of each module at a time), "max" (one), an int, a list (one per module) or None."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def set_attention_slice(self, slice_size) -> None:
        for module in self._modules():
            if hasattr(module, "set_attention_slice"):
                module.set_attention_slice(slice_size)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Networks rest on the CPU; each moves whole to the accelerator when it runs (offload.py).
        Without an accelerator: diffusers' RuntimeError."""
        from . import offload

        offload.enable(self, "model", gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Every layer's weights rest on the CPU and visit the accelerator for that layer's forward
        only (offload.py). Without an accelerator: diffusers' RuntimeError."""
        from . import offload

        offload.enable(self, "sequential", gpu_id=gpu_id, device=device)

    def remove_all_hooks(self) -> None:
        """Take the offload hooks off (the networks stay where they are)."""
        from . import offload

        offload.remove(self)

    def maybe_free_model_hooks(self) -> None:
        """After a call with model offload: every network back on the CPU."""
        offload = self.__dict__.get("_offload")
        if offload is not None:
            offload.offload_all()

    def _offload_phase(self, *names: str) -> None:
        """A call's phase begins: with offload on, bring its networks (hooks cover direct calls too)."""
        offload = self.__dict__.get("_offload")
        if offload is not None:
            offload.check_call()
            offload.refresh(self)
            offload.onload_names(self, names)

    # ---- progress bar --------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising progress bar (``disable=True`` turns it off)."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        return tqdm(iterable=iterable, total=total, **self._progress_bar_config)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **kwargs):
        """Load a pipeline folder (or hub id) in diffusers' layout; components can be overridden."""
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        load = {k: kwargs.pop(k) for k in LOAD_KWARGS if k in kwargs}
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else torch_dtype
        index_path = resolve_file(path_or_id, "model_index.json", **hub)
        index = read_json(index_path)
        pipe_cls = cls._class_for_index(index, index_path)
        source = str(index_path.parent) if Path(path_or_id).expanduser().is_dir() else str(path_or_id)

        components = {}
        for name in pipe_cls.component_names:
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            components[name] = pipe_cls._load_component(
                name, index.get(name), source, index_path, dtype, load, hub
            )
        config = {k: v for k, v in index.items() if k in pipe_cls.config_defaults}
        for key in list(kwargs):
            if key in pipe_cls.config_defaults:
                config[key] = kwargs.pop(key)
        if kwargs:
            logger.warning("%s.from_pretrained: ignored unknown arguments %s", pipe_cls.__name__, ", ".join(sorted(kwargs)))
        pipe = pipe_cls(**components, **config)
        pipe.name_or_path = str(path_or_id)
        return pipe

    @classmethod
    def _class_for_index(cls, index: dict, index_path: Path) -> type:
        classes = pipeline_classes()
        if cls.component_names:  # a concrete pipeline class loads any compatible folder
            return cls
        name = index.get("_class_name")
        if not isinstance(name, str) or name not in classes:
            raise ConfigError(
                f"{index_path}: _class_name {name!r} is not a pipeline diffusion-runtime implements; "
                f"supported: {', '.join(sorted(classes))}"
            )
        return classes[name]

    @classmethod
    def _load_component(cls, name, entry, source, index_path, dtype, load, hub):
        optional = name in cls.optional_components
        if entry is None or not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
            if not optional:
                raise ConfigError(f"{index_path}: {cls.__name__} needs the component {name!r}, which is missing or null")
            return None
        library, class_name = entry
        if not isinstance(class_name, str) or not isinstance(library, (str, type(None))):
            raise ConfigError(f"{index_path}: component {name!r} is {list(entry)!r}; expected "
                              "[library, class name], two strings")
        our = model_class(class_name)
        if our is None:
            if optional:
                reason = UNSUPPORTED_OPTIONAL.get(class_name, "it is not implemented")
                logger.warning("%s: component %r (%s.%s) not loaded: %s", index_path.parent, name, library, class_name, reason)
                return None
            raise ConfigError(
                f"{index_path}: component {name!r} is {library}.{class_name}, which diffusion-runtime "
                f"does not implement; pass {name}=... to from_pretrained to supply one"
            )
        component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
        if isinstance(our, type) and issubclass(our, nn.Module):
            return _call_with_accepted(our.from_pretrained, source, subfolder=name, dtype=component_dtype, **load, **hub)
        return _call_with_accepted(our.from_pretrained, source, subfolder=name, **hub)

    # ---- saving ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None, **kwargs) -> None:
        """Write model_index.json and each component in its subfolder (model_index.json last).

        The whole folder is written in a temporary sibling (what the target already holds is carried
        over as hard links, so other variants stay) and swapped in at the end, as a model's save is
        (runtime/models/checkpoint_save.py): a crash or a full disk leaves the previous pipeline
        folder as it was, never some components old and others new. Large files are carried over as
        hard links: every writer of weights writes new files, never into an existing one."""
        import errno
        import shutil

        from runtime.models.checkpoint_save import _link_or_copy, disk_full, swap_in, sweep_stale, temp_sibling

        directory = Path(save_directory).expanduser().absolute()
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(directory)
        tmp = temp_sibling(directory)
        try:
            if directory.is_dir():  # small files copied, so nothing written in place can reach the old folder
                shutil.copytree(directory, tmp, symlinks=True, dirs_exist_ok=True,
                                ignore=lambda d, names: ["model_index.json"] if Path(d) == directory else [],
                                copy_function=lambda a, b: (shutil.copy2(a, b) if os.path.getsize(a) < 2**20
                                                            else _link_or_copy(a, b)))
            index = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_COMPAT_VERSION}
            index.update({k: v for k, v in self.config.items() if not k.startswith("_")})
            for name, component in self.components.items():
                if component is None:
                    index[name] = [None, None]
                    continue
                index[name] = [library_of(component), type(component).__name__]
                _call_with_accepted(component.save_pretrained, tmp / name, variant=variant, **kwargs)
            atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
            swap_in(tmp, directory)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise disk_full(directory) from exc
            raise

    # ---- sharing ---------------------------------------------------------------------------
    @classmethod
    def from_pipe(cls, pipe: "DiffusionPipeline", **kwargs):
        """A pipeline of this class over ``pipe``'s components (the same objects, nothing reloaded)."""
        target = cls if cls.component_names else type(pipe)
        components = {n: kwargs.pop(n) if n in kwargs else getattr(pipe, n, None) for n in target.component_names}
        config = {k: v for k, v in pipe.config.items() if k in target.config_defaults}
        for key in list(kwargs):
            if key in target.config_defaults:
                config[key] = kwargs.pop(key)
        if kwargs:
            raise TypeError(f"{target.__name__}.from_pipe: unexpected arguments {', '.join(sorted(kwargs))}")
        new = target(**components, **config)
        new._progress_bar_config = dict(pipe._progress_bar_config)
        new.name_or_path = pipe.name_or_path
        return new
