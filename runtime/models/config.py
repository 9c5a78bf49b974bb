"""Config handling with diffusers' contract: ``config.json`` keys are ``__init__`` arguments.

A class opts in by subclassing ``ConfigMixin`` and decorating ``__init__`` with
``@register_to_config``; the bound arguments become ``self.config``, a read-only mapping with
attribute access, saved and loaded as JSON with diffusers' metadata keys (``_class_name``,
``_diffusers_version``, ``_name_or_path``) kept.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import atomic_write_text

logger = logging.getLogger(__name__)

# The diffusers release whose config semantics we follow; written when a config has none.
DIFFUSERS_COMPAT_VERSION = "0.42.1"
METADATA_KEYS = ("_class_name", "_diffusers_version", "_name_or_path")


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.in_channels``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a model's config is read-only; build a new model with from_config")

    __setitem__ = __delitem__ = _readonly
    setdefault = pop = popitem = clear = update = _readonly  # type: ignore[assignment]

    def __deepcopy__(self, memo):
        import copy

        return FrozenConfig({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def __reduce__(self):
        return (FrozenConfig, (dict(self),))


def _init_parameters(cls) -> dict[str, inspect.Parameter]:
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    params = dict(inspect.signature(init).parameters)
    params.pop("self", None)
    return {
        n: p
        for n, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def register_to_config(init):
    """Decorator for ``__init__``: record the bound arguments (defaults filled) as the config."""

    signature = inspect.signature(init)  # once per class, not per construction

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        config = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name == "self" or kind == inspect.Parameter.VAR_POSITIONAL:
                continue
            if kind == inspect.Parameter.VAR_KEYWORD:
                continue
            config[name] = _jsonable(value)
        init(self, *args, **kwargs)
        meta = getattr(self, "_pending_metadata", None) or {}
        self.register_config(config, meta)

    return wrapper


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class ConfigMixin:
    """Adds ``config``, ``from_config``, ``load_config`` and ``save_config`` to a class."""

    config_name: str = "config.json"
    # Schedulers take each other's configs (``Euler.from_config(ddim.config)``): no warning there.
    warn_unknown_config_keys: bool = True

    def register_config(self, config: dict, metadata: dict | None = None) -> None:
        full = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_COMPAT_VERSION}
        full.update(metadata or {})
        full.update(config)
        object.__setattr__(self, "_internal_config", FrozenConfig(full))

    @property
    def config(self) -> FrozenConfig:
        return self._internal_config

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load_config(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> dict:
        """Read ``config_name`` from a folder or hub id; returns the raw dict (metadata kept)."""
        from .hub import resolve_file

        path = resolve_file(path_or_id, cls.config_name, subfolder=subfolder, **hub_kwargs)
        return read_json(path)

    @classmethod
    def from_config(cls, config: dict | None = None, *, _source: str | None = None, **overrides):
        """Build an instance from a config mapping (and keyword overrides of single keys)."""
        config = dict(config or {})
        config.update(overrides)
        init_kwargs, metadata = cls.extract_init_kwargs(config, source=_source)
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_pending_metadata", metadata)
        obj.__init__(**init_kwargs)
        try:
            del obj._pending_metadata
        except AttributeError:
            pass
        return obj

    @classmethod
    def extract_init_kwargs(cls, config: dict, source: str | None = None) -> tuple[dict, dict]:
        """Split a config into ``__init__`` kwargs and kept metadata; warn on unknown keys."""
        params = _init_parameters(cls)
        where = source or f"{cls.__name__} config"
        kwargs = {k: v for k, v in config.items() if k in params}
        metadata = {k: config[k] for k in METADATA_KEYS if k in config}
        metadata.pop("_class_name", None)
        unknown = sorted(k for k in config if k not in params and not k.startswith("_"))
        if unknown:
            msg = f"{where}: unknown config keys ignored by {cls.__name__}: {', '.join(unknown)}"
            if cls.warn_unknown_config_keys:
                logger.warning(msg)
            else:
                logger.debug(msg)
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
        if missing:
            raise ConfigError(f"{where}: missing required config keys for {cls.__name__}: {', '.join(missing)}")
        return kwargs, metadata

    # ---- saving --------------------------------------------------------------------------
    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config_name`` into ``save_directory`` atomically; returns the file's path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = dict(self.config)
        data["_class_name"] = type(self).__name__
        data.pop("_name_or_path", None)
        target = directory / self.config_name
        atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")
        return target


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path``; invalid JSON is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        from .errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
