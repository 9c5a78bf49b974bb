"""Error classes of diffusion-runtime (re-exported as ``runtime.errors``).

They live in ``runtime.models`` because imports run pipelines -> optim -> models: the lowest layer
owns them so every layer can raise them.

Every error subclasses the builtin that fits it, so callers can catch either ours or the
builtin; every message names what is wrong and where (file, key, shape, value).
"""
from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of every error raised on purpose by diffusion-runtime."""


class ConfigError(RuntimeErrorBase, ValueError):
    """A config file or config value is invalid (bad JSON, missing key, unknown class)."""


class CheckpointError(RuntimeErrorBase, ValueError):
    """A weights file is unreadable, truncated, or does not fit the model."""


class MissingWeightsError(CheckpointError):
    """The checkpoint lacks weights the model needs (never silently random)."""


class ShapeMismatchError(CheckpointError):
    """A weight's shape differs from what the model's config expects."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint would be loaded where it is not allowed."""


class CheckpointNotFoundError(RuntimeErrorBase, FileNotFoundError):
    """No checkpoint folder, file or hub cache entry could be found."""


class InputError(RuntimeErrorBase, ValueError):
    """A pipeline or scheduler argument is invalid."""


class OptimizationError(RuntimeErrorBase, ValueError):
    """An optimize() override or pass setting is invalid."""


class DependencyMissingError(RuntimeErrorBase, ModuleNotFoundError):
    """An optional package a requested feature needs is not installed (e.g. xformers)."""


class BackendUnavailableError(RuntimeErrorBase, ValueError):
    """A requested kernel or backend cannot run on this machine (e.g. xformers without CUDA)."""


class LoraError(RuntimeErrorBase, ValueError):
    """A LoRA or textual-inversion file, adapter name or adapter setting is invalid (names the key or value)."""
