"""Public error classes; defined in ``runtime.models.errors`` so every layer can raise them."""
from runtime.models.errors import (  # noqa: F401
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    MissingWeightsError,
    OptimizationError,
    RuntimeErrorBase,
    ShapeMismatchError,
    UnsafeCheckpointError,
)
