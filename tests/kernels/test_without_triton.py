"""`import runtime.kernels` works without Triton; every entry point then says clearly that it needs it,
and the references still work. Run in a subprocess where importing triton fails."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError
    import torch
    from runtime import kernels
    assert not kernels.triton_available()
    q = torch.randn(1, 1, 3, 8)
    assert kernels.attention_supports(q, q, q) == "Triton is not installed"
    assert kernels.group_norm_supports(torch.randn(1, 4, 2, 2), 2) == "Triton is not installed"
    calls = {
        "attention": lambda: kernels.attention(q, q, q),
        "group_norm": lambda: kernels.group_norm(torch.randn(1, 4, 2, 2), 2),
        "geglu": lambda: kernels.geglu(torch.randn(2, 8), torch.randn(8, 8)),
    }
    for name, call in calls.items():
        try:
            call()
        except kernels.TritonUnavailableError as e:
            assert f"kernels.{name} needs Triton, which is not installed" in str(e), e
        else:
            raise AssertionError(name + " ran without triton")
    torch.testing.assert_close(kernels.attention_ref(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))
    print("ok")
""")


def test_import_and_clear_errors_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
