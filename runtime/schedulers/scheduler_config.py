"""Scheduler configs with diffusers' ``ConfigMixin`` semantics, so switching classes behaves alike.

``Other.from_config(scheduler.config)`` is how diffusers users switch schedulers. Its rules:

* ``__init__`` arguments given explicitly are the config; the ones left at their defaults are
  listed in ``_use_default_values``, and a class built from that config takes *its own*
  defaults for them (they are dropped before building).
* Keys the building class does not take (``clip_sample`` handed to Euler, ``skip_prk_steps`` to
  DDIM) stay in the new config as hidden entries, so the next switch hands them on.
* Keys starting with ``_`` are metadata, never ``__init__`` arguments.

The config is registered *before* ``__init__`` runs (so ``__init__`` may read ``self.config``)
and ``register_to_config(**kw)`` merges into it, as diffusers' method does.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from runtime.models.config import DIFFUSERS_COMPAT_VERSION, ConfigMixin, FrozenConfig
from runtime.models.errors import ConfigError
from runtime.models.files import atomic_write_text

logger = logging.getLogger(__name__)

USE_DEFAULT_VALUES = "_use_default_values"
# load_config's own keyword arguments (the rest of from_pretrained's kwargs override config keys)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies",
              "resume_download", "user_agent", "subfolder", "use_auth_token", "local_dir")
_NOT_SAVED = (USE_DEFAULT_VALUES, "_ignore_files", "_name_or_path", "_pre_quantization_dtype")


def _init_params(init) -> list[inspect.Parameter]:
    params = list(inspect.signature(init).parameters.values())[1:]
    return [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


@functools.lru_cache(maxsize=None)
def init_keys(cls) -> frozenset[str]:
    """The names ``cls.__init__`` takes (through ``register_to_config``'s wrapper)."""
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    return frozenset(p.name for p in _init_params(init))


def _config_value(value):
    """Tuples become lists, as they would after a JSON round trip; everything else as given."""
    if isinstance(value, tuple):
        return [_config_value(v) for v in value]
    return value


def register_to_config(init):
    """Decorator for a scheduler's ``__init__``: record its arguments as ``self.config``.

    Explicit arguments (positional or keyword) are the config; the defaulted ones are also
    recorded and listed in ``_use_default_values``. ``_``-prefixed keywords go to the config only.
    """
    params = _init_params(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        ignore = set(getattr(self, "ignore_for_config", ()))
        config = {p.name: _config_value(a) for p, a in zip(params, args) if p.name not in ignore}
        defaulted = []
        for p in params[len(args):]:
            if p.name in ignore:
                continue
            if p.name in public:
                config[p.name] = _config_value(public[p.name])
            else:
                config[p.name] = _config_value(p.default)
                defaulted.append(p.name)
        if defaulted:
            config[USE_DEFAULT_VALUES] = defaulted
        self.register_to_config(**private, **config)
        init(self, *args, **public)

    return wrapper


def _check_value_types(cls, init_dict: dict) -> None:
    """A config value must have its default's kind (int, float, bool, str) where the default has one:
    ``steps_offset: null`` or ``clip_sample: "yes"`` is a ConfigError naming key and value, not a
    TypeError from inside ``set_timesteps`` later."""
    params = inspect.signature(cls.__init__).parameters
    for key, value in init_dict.items():
        default = params[key].default if key in params else None
        if isinstance(default, bool):
            ok = isinstance(value, (bool, np.bool_))
        elif isinstance(default, int):
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise ConfigError(f"{cls.__name__}: config value {key}={value!r} should be "
                              f"{'a' if not isinstance(default, int) or isinstance(default, bool) else 'an'} "
                              f"{type(default).__name__} (default {default!r})")


def json_saveable(value):
    """A config value as JSON can hold it (numpy arrays and tensors become lists)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [json_saveable(v) for v in value]
    if isinstance(value, dict):
        return {k: json_saveable(v) for k, v in value.items()}
    return value


class SchedulerConfigMixin(ConfigMixin):
    """``config``, ``from_config``, ``from_pretrained``, ``save_config`` with diffusers' rules."""

    config_name = "scheduler_config.json"
    ignore_for_config: tuple = ()

    def register_to_config(self, **kwargs) -> None:
        """Merge ``kwargs`` into the config (later keys win), as diffusers' method does."""
        kwargs.pop("kwargs", None)
        current = self.__dict__.get("_internal_config")
        merged = {**current, **kwargs} if current is not None else dict(kwargs)
        object.__setattr__(self, "_internal_config", FrozenConfig(merged))

    def register_config(self, config: dict, metadata: dict | None = None) -> None:
        # runtime.models.config's decorator (on a user's subclass) registers after __init__: merge.
        self.register_to_config(**(metadata or {}), **config)

    @classmethod
    def extract_init_dict(cls, config: Mapping, **kwargs) -> tuple[dict, dict, dict]:
        """(``__init__`` kwargs, unused kwargs, hidden config) for ``config`` plus overrides."""
        defaulted = set(config.get(USE_DEFAULT_VALUES) or ())
        config = {k: v for k, v in config.items() if k not in defaulted and k != USE_DEFAULT_VALUES}
        original = dict(config)
        expected = set(init_keys(cls)) - set(cls.ignore_for_config)
        from . import SCHEDULER_CLASSES  # the classes whose keys are expected in a scheduler config

        others = set().union(*(init_keys(c) for c in SCHEDULER_CLASSES.values())) - init_keys(cls)
        source = config.get("_class_name")
        if source is not None and not isinstance(source, (str, list, tuple)):
            raise ConfigError(f"{cls.__name__}.from_config: _class_name must be a string, got {source!r}")
        leftover = {k: v for k, v in config.items()
                    if k not in others and k not in expected and not k.startswith("_")
                    and k != "quantization_config"}
        init_dict = {}
        for key in expected:
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
            elif key in config:
                init_dict[key] = config[key]
        if leftover:
            logger.debug("%s: config keys %s are not %s arguments; kept in its config",
                         cls.__name__, sorted(leftover), cls.__name__)
        unused = {**leftover, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    @classmethod
    def from_config(cls, config: Mapping | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Build from another scheduler's config (or a loaded scheduler_config.json); kwargs override."""
        kwargs.pop("_source", None)
        if config is None:
            raise ConfigError(f"{cls.__name__}.from_config: pass a config (for example scheduler.config) "
                              "as the first argument")
        if isinstance(config, (str, os.PathLike)):  # diffusers' deprecated form: a folder or hub id
            config = cls.load_config(config, **{k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs})
        if not isinstance(config, Mapping):
            raise ConfigError(f"{cls.__name__}.from_config: expected a config mapping, got {type(config).__name__}")
        init_dict, unused, hidden = cls.extract_init_dict(config, **kwargs)
        _check_value_types(cls, init_dict)
        try:
            obj = cls(**init_dict)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                RuntimeError) as exc:  # a value of a type or range the schedule cannot be built from
            given = {k: init_dict[k] for k in init_dict if k in config or k in kwargs}
            raise ConfigError(f"{cls.__name__}: cannot build the schedule from this config "
                              f"({type(exc).__name__}: {exc}; config values given: {given})") from exc
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        obj.register_to_config(**hidden)
        return (obj, {**unused, **hidden}) if return_unused_kwargs else obj

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        subfolder: str | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Load ``scheduler_config.json`` from a folder or hub id; other kwargs override its keys."""
        if pretrained_model_name_or_path is None:
            raise ConfigError(f"{cls.__name__}.from_pretrained: pass a folder or hub id")
        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_json_string(self) -> str:
        data = {k: json_saveable(v) for k, v in self.config.items() if k not in _NOT_SAVED}
        data["_class_name"] = type(self).__name__
        data["_diffusers_version"] = DIFFUSERS_COMPAT_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> Path:
        """Write scheduler_config.json atomically (without ``_use_default_values``)."""
        if push_to_hub:
            raise ConfigError(f"{type(self).__name__}.save_config: push_to_hub is not supported; "
                              "save locally and upload the folder")
        directory = Path(save_directory)
        if directory.is_file():
            raise ConfigError(f"{type(self).__name__}.save_config: {directory} is a file, not a folder")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / self.config_name
        atomic_write_text(target, self.to_json_string())
        return target

    save_pretrained = save_config
