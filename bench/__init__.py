"""Benchmarks: our pipelines against the reference implementations on the same weights (docs/ARCHITECTURE.md §9).

``python3 -m bench --quick`` runs the smoke comparison; ``bench.cli.main(argv)`` is the
``diffusion-runtime bench`` subcommand; ``bench/micro`` holds pytest-benchmark per-function timings.
"""
