"""Hypothesis profiles for the reliability tests.

CI runs the bounded ``ci`` profile (the default). A longer fuzzing run is one command::

    HYPOTHESIS_PROFILE=long PYTHONPATH=$PWD python3 -m pytest -q -p no:cacheprovider tests/reliability/test_reliability_fuzz.py

Neither profile writes an example database into the checkout; a crashing input found by a long
run is kept as an ``@example`` (or an explicit test) beside the property it broke.
"""
import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

_COMMON = dict(database=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large])
# deadline: the per-example time bound ("no hang"); generous because the CI machine is shared.
settings.register_profile("ci", max_examples=40, deadline=timedelta(seconds=10), **_COMMON)
settings.register_profile("long", max_examples=2000, deadline=timedelta(seconds=10), **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stress_pipes(sd_folder):
    """bench/bench_concurrency.py's pipelines over the tiny sd_folder (levels 0 and 3), built once."""
    from bench.bench_concurrency import build_pipes

    return build_pipes(sd_folder)
