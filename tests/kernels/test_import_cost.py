"""On a machine without CUDA and outside Triton's interpreter, the Triton kernels cannot run, so they are
not registered as torch ops: registering one imports torch._dynamo and inductor (about a second of a
CPU process's first optimize). Their entry points still say why they cannot run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys, torch
import runtime.kernels as k
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
q = torch.randn(1, 1, 4, 8)
try:
    k.attention(q, q, q)
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the Triton ops are registered")
def test_kernels_import_without_dynamo_on_a_cpu_machine():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "no dynamo"
    assert "cpu" in lines[1] and ("not supported" in lines[1] or "Triton" in lines[1])  # the clear error
