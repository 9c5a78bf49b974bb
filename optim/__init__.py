"""The optimization layer: one pass per file, levels, parity metrics."""
