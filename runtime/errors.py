"""Public error classes; defined in ``runtime.models.errors`` so every layer can raise them."""
from runtime.models.errors import (  # noqa: F401
    BackendUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DependencyMissingError,
    InputError,
    LoraError,
    MissingWeightsError,
    OptimizationError,
    RuntimeErrorBase,
    ShapeMismatchError,
    UnsafeCheckpointError,
)
