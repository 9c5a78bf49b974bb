"""Kernel tests run Triton's interpreter on CPU: TRITON_INTERPRET=1 must be set before Triton
and the kernels are imported, so it is set here, at conftest import (pytest imports this file
before collecting the test modules beside it). Harmless to the rest of the suite: nothing else
launches Triton kernels, and inductor's CPU backend does not use Triton.

On a CUDA machine run with TRITON_INTERPRET=0 to test the compiled kernels on the GPU instead.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels run: CPU under the interpreter, else CUDA; skip when neither works."""
    kernels = pytest.importorskip("runtime.kernels")
    pytest.importorskip("triton")
    if kernels.interpreter_mode():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("kernels was imported without TRITON_INTERPRET=1 (by an earlier test module) and there is no CUDA")


@pytest.fixture(autouse=True)
def _no_grad():
    """The kernels are forward-only: run every test under no_grad, as inference does."""
    with torch.no_grad():
        yield
