"""The LoRA term at bf16 on CPU: the one-pass kernel or the two matmuls, chosen by measuring
(runtime/lora/term_kernel.py), both adding what fp64 adds within a bf16 budget."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.kernels import lora_cpu
from runtime.lora import term_kernel
from runtime.lora.entry import AdapterWeights, LoraEntry
from runtime.models.layers import Linear
from runtime.optim import dispatch

needs_kernel = pytest.mark.skipif(lora_cpu.cpu_lora_term_ready() is not None,
                                  reason=f"CPU kernel: {lora_cpu.cpu_lora_term_ready()}")


class _State:
    enabled, active, target_rank = True, ["a"], None

    def __init__(self, scale=1.0):
        self.scale = scale

    def call_scale(self):
        return self.scale


@pytest.fixture(autouse=True)
def fresh_choices():
    term_kernel.forget()
    yield
    term_kernel.forget()


def adapted(k=96, n=80, r=8, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n).to(torch.bfloat16)
    down = torch.randn(r, k, generator=g) / k ** 0.5
    up = torch.randn(n, r, generator=g) / r ** 0.5
    entry = LoraEntry(_State(scale), "to_q", layer)
    entry.adapters["a"] = AdapterWeights(down, up, down, up, rank=r, alpha=r / 2, scaling=0.5)
    layer.compute = [("lora", entry)]
    return layer, entry, down, up


def counted(monkeypatch):
    calls = []
    launch = lora_cpu.lora_term_launch

    def spy(*args):
        calls.append(args[0].shape)
        return launch(*args)

    monkeypatch.setattr(lora_cpu, "lora_term_launch", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("faster", [term_kernel.KERNEL, term_kernel.MATMULS])
def test_the_measured_faster_one_runs_and_both_add_what_fp64_adds(monkeypatch, faster, dtype):
    if lora_cpu.cpu_lora_term_ready(dtype) is not None:
        pytest.skip(f"CPU kernel: {lora_cpu.cpu_lora_term_ready(dtype)}")
    layer, entry, down, up = adapted(scale=0.8)
    layer.to(dtype)
    x = torch.randn(2, 37, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    times = {term_kernel.KERNEL: 1.0, term_kernel.MATMULS: 2.0}
    if faster == term_kernel.MATMULS:
        times = {term_kernel.KERNEL: 2.0, term_kernel.MATMULS: 1.0}
    calls = counted(monkeypatch)
    with dispatch.using(timer=dispatch.fixed_timer(times), cache=dispatch.DispatchCache(None)), torch.no_grad():
        got = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
    assert len(calls) == (1 if faster == term_kernel.KERNEL else 0)
    [(shape, summary)] = term_kernel.choices().items()
    assert shape == (74, 96, 8, 80, str(dtype).removeprefix("torch.")) and f"-> {faster} (measured" in summary
    d, u = down.to(dtype).double(), up.to(dtype).double()
    h = x.double() @ d.t()
    ref = base.double() + 0.8 * 0.5 * h @ u.t()
    sums = 0.4 * (x.double().abs() @ d.abs().t()) @ u.abs().t()
    if dtype == torch.bfloat16:
        bound = ref.abs() * 2.0 ** -8 + 0.4 * h.abs() @ u.abs().t() * 2.0 ** -7 + 1e-6
    else:  # fp32: the sums' order only (no rounding between the products)
        bound = (ref.abs() + base.double().abs() + sums) * 2.0 ** -20 + 1e-7
    assert ((got.double() - ref).abs() <= bound).all()


@needs_kernel
def test_a_column_slice_of_a_fused_output_gets_the_term_and_nothing_else(monkeypatch):
    """What fused q/k/v hand the entry (``add_term`` on their slice): the kernel writes that slice alone."""
    layer, entry, down, up = adapted(k=64, n=48)
    calls = counted(monkeypatch)
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    wide = torch.randn(3, 20, 3 * 48, generator=torch.Generator().manual_seed(3)).bfloat16()
    before = wide.clone()
    with torch.no_grad():
        entry.add_term(layer, wide[..., 48:96], x)
        expected = entry.add_term(layer, before[..., 48:96].contiguous(), x)
    assert len(calls) == 2  # the fake timer of tests/conftest.py prefers ours
    assert torch.equal(wide[..., 48:96], expected)
    assert torch.equal(wide[..., :48], before[..., :48]) and torch.equal(wide[..., 96:], before[..., 96:])


def test_where_the_kernel_cannot_run_the_matmuls_do_and_say_why(monkeypatch):
    monkeypatch.setattr(lora_cpu, "cpu_lora_term_ready", lambda dtype=torch.bfloat16: "this CPU has no AVX512-BF16")
    layer, entry, down, up = adapted()
    x = torch.randn(5, 96).bfloat16()
    with torch.no_grad():
        got = layer(x)
    assert entry.kernel_packs[(torch.bfloat16, torch.device("cpu"))] is None  # no kernel weights packed
    h = F.linear(x, down.bfloat16())
    plain = F.linear(x, layer.weight, layer.bias).addmm_(h, (up * 0.5).bfloat16().t())
    assert torch.equal(got, plain)
    assert term_kernel.use_kernel(5, 96, 8, 80) is False
    assert term_kernel.choices() == {(5, 96, 8, 80, "bfloat16"): "this CPU has no AVX512-BF16"}


@needs_kernel
def test_autograd_keeps_the_matmuls(monkeypatch):
    calls = counted(monkeypatch)
    layer, entry, down, up = adapted()
    xb = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)
    layer(xb).sum().backward()  # the kernel is forward-only: autograd's path runs
    assert calls == [] and xb.grad is not None


@needs_kernel
def test_a_1x1_convolution_on_channels_last_tensors_takes_the_kernel(monkeypatch):
    """proj_in / proj_out at level 2: each pixel a row of channels; a contiguous (channels-first) input keeps
    the matmuls, and both add what fp64 adds."""
    from runtime.models.layers import Conv2d

    g = torch.Generator().manual_seed(4)
    layer = Conv2d(64, 48, 1).to(torch.bfloat16)
    down, up = torch.randn(8, 64, 1, 1, generator=g) / 8, torch.randn(48, 8, 1, 1, generator=g) / 3
    entry = LoraEntry(_State(0.5), "proj_in", layer)
    entry.adapters["a"] = AdapterWeights(down, up, down, up, rank=8, alpha=8, scaling=1.0)
    layer.compute = [("lora", entry)]
    calls = counted(monkeypatch)
    x = torch.randn(2, 64, 6, 5, generator=g).bfloat16()
    ref = F.conv2d(x.double(), layer.weight.double(), layer.bias.double()) + 0.5 * F.conv2d(
        F.conv2d(x.double(), down.bfloat16().double()), up.bfloat16().double())
    with torch.no_grad():
        cl = layer(x.contiguous(memory_format=torch.channels_last))
        assert len(calls) == 1 and cl.is_contiguous(memory_format=torch.channels_last)
        plain = layer(x)
        assert len(calls) == 1  # channels-first: the matmuls
    for got in (cl, plain):
        assert (got.double() - ref).abs().max() <= ref.abs().max() * 2.0 ** -6


@needs_kernel
def test_hotswap_padding_costs_the_kernel_nothing(monkeypatch):
    """A rank-8 adapter in a rank-64 hotswap slot: the kernel and the fused GEGLU's factors see rank 8, and
    the layer computes what the unpadded adapter gives, bit for bit."""
    from runtime.lora.entry import padded

    layer, entry, down, up = adapted(k=64, n=48)
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    with torch.no_grad():
        plain = layer(x)
    slot, slot_entry, _, _ = adapted(k=64, n=48)
    slot_entry.state.target_rank = 64
    slot_entry.adapters["a"] = AdapterWeights(padded(down, 64, 0), padded(up, 64, 1), down, up, rank=8, alpha=4,
                                              scaling=0.5, padded=True)
    slot.weight, slot.bias = layer.weight, layer.bias
    calls = counted(monkeypatch)
    with torch.no_grad():
        got = slot(x)
        h, factor_up = slot_entry.low_rank(slot, x)
    assert calls == [(3, 11, 48)] and torch.equal(got, plain)
    key = (torch.bfloat16, torch.device("cpu"))
    assert slot_entry.kernel_packs[key][0].shape == (8, 64) and slot_entry.packs[key][0].shape == (64, 64)
    assert h.shape == (3, 11, 8) and factor_up.shape == (48, 8)
