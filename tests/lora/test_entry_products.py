"""The adapter entry's low-rank products (runtime/lora/entry.py) against the plain convolutions they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.lora.entry import LoraEntry


class _State:
    enabled, active, target_rank = True, [], None

    def call_scale(self):
        return 1.0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_1x1_down_product_as_a_matmul_equals_the_convolution_and_folds_into_either_layout(layout, dtype):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 48, 1)
    entry = LoraEntry(_State(), "proj_in", conv)
    x = torch.randn(2, 64, 9, 7, generator=g, dtype=torch.float64)
    down = torch.randn(8, 64, 1, 1, generator=g, dtype=torch.float64) * 0.1
    up = torch.randn(48, 8, 1, 1, generator=g, dtype=torch.float64) * 0.1
    ref = F.conv2d(F.conv2d(x, down), up)  # fp64
    xs = x.to(dtype)
    if layout == "channels_last":
        xs = xs.contiguous(memory_format=torch.channels_last)
    h = entry._down(xs, down.to(dtype))
    assert h.shape == (2, 8, 9, 7)
    plain = F.conv2d(xs, down.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(h.double(), plain.double(), atol=tol, rtol=tol)
    for out_layout in (torch.contiguous_format, torch.channels_last):
        out = torch.zeros(2, 48, 9, 7, dtype=dtype).contiguous(memory_format=out_layout)
        assert entry._fold(out, h, up.to(dtype), 0.5)
        assert torch.allclose(out.double(), 0.5 * ref, atol=tol, rtol=tol)
