"""The optimization layer: one pass per file, levels, parity metrics (docs/ARCHITECTURE.md §4)."""
from .base import OptimizationReport, Pass  # noqa: F401
from .levels import LEVEL_ADDS, PASSES, build_plan  # noqa: F401
from .optimize import optimize  # noqa: F401
