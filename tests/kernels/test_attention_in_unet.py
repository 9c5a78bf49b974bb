"""Model level: the tiny SD1-shaped UNet with every attention routed through kernels.attention
(interpreter) matches the same UNet on PyTorch SDPA: in fp32 to fp32 rounding, and in bf16
within the kernels' budget against the fp32 model (2x SDPA-in-bf16's own error + atol)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from runtime import kernels  # noqa: E402
from kernel_budget import assert_within_budget  # noqa: E402
from runtime.models import UNet2DConditionModel  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "kernels_tiny_configs", Path(__file__).resolve().parents[1] / "models" / "tiny_configs.py")
tiny_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_configs)


def triton_backend(q, k, v, mask):
    """The attention-backend slot's signature: (q, k, v, mask) on (B, H, T, D)."""
    return kernels.attention(q, k, v, attn_mask=mask)


@pytest.fixture(scope="module")
def unet_and_inputs():
    config = tiny_configs.unet_config("sd1")
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(config).eval()
    inputs = tiny_configs.unet_inputs(config, batch=1, height=8, width=8, seq=7)
    return model, inputs


def run(model, inputs, backend, dtype, device):
    model.to(device=device, dtype=dtype).set_attention_backend(backend)
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k != "timestep" else v.dtype)
            for k, v in inputs.items()}
    try:
        with torch.no_grad():
            return model(**cast).sample.cpu()
    finally:
        model.set_attention_backend(None)
        model.to(device="cpu", dtype=torch.float32)


def test_unet_with_triton_attention_matches_sdpa(device, unet_and_inputs):
    model, inputs = unet_and_inputs
    calls = []

    def counting_backend(q, k, v, mask):
        calls.append(tuple(q.shape))
        return triton_backend(q, k, v, mask)

    reference = run(model, inputs, None, torch.float32, device)
    out = run(model, inputs, counting_backend, torch.float32, device)
    assert calls, "the Triton backend was never called"
    assert {shape[-1] for shape in calls} == {8, 16}  # head dims of the tiny config's two widths
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)

    out_bf16 = run(model, inputs, triton_backend, torch.bfloat16, device)
    sdpa_bf16 = run(model, inputs, None, torch.bfloat16, device)
    assert_within_budget(out_bf16, sdpa_bf16, reference, "unet bf16")
