"""Benchmarks: our pipelines against the reference implementations on the same weights (docs/ARCHITECTURE.md §9).

Run from a checkout of the repository (this folder is not installed with the package):
``python3 -m bench --quick`` runs the smoke comparison through ``bench.cli.main(argv)``;
``bench/micro`` holds pytest-benchmark per-function timings.
"""
