"""What the passes decide on each kind of x86-64 CPU users have, under faked flag sets
(runtime/kernels/cpu_features.py), never on whatever this host happens to be: which kernels are
available and why not, whether bf16 is chosen, and, from measurement with fake timers
(runtime/optim/dispatch.py), which attention backend each module gets and which convolutions and
GEGLU projections our kernels take; explicit settings force a choice. Nothing here runs a kernel: the
fake timers time nothing, and a faked flag the host lacks is safe only for decisions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime
from runtime import optim
from runtime.kernels import cpu_build, cpu_features
from runtime.kernels.cpu_features import CpuFeatures
from runtime.models.attention import sdpa_backend
from runtime.models.errors import OptimizationError
from runtime.models.transformer_2d import GEGLU
from runtime.optim import dispatch, hardware
from runtime.optim.attention import OURS, choose_backend, cpu_backend
from runtime.optim.geglu import GEGLUPass
from runtime.optim.undo import entry
from runtime.optim.winograd import WinogradPass, kernel_ready
from pipeline_fixtures import quiet_pipeline

BF16, FP32 = torch.bfloat16, torch.float32
CPU = torch.device("cpu")

# name -> (flags, x86-64); the CPUs seen so far and the common ones around them
CPUS = {
    "xeon-amx": (("avx512", "avx512_bf16", "amx"), True),  # Sapphire Rapids and later
    "epyc-avx512-bf16": (("avx512", "avx512_bf16"), True),  # AMD Zen 4 / Zen 5, Cooper Lake
    "avx512-only": (("avx512",), True),  # Skylake-SP, Cascade Lake, Ice Lake servers
    "avx2-only": (("avx2",), True),  # AMD Zen 2 / Zen 3, client Intel
    "no-avx2": ((), True),  # x86-64 before AVX2 (or a VM that hides it)
    "not-x86": ((), False),  # Arm servers (Graviton), Apple silicon
}


@pytest.fixture(params=sorted(CPUS))
def cpu(request, fake_cpu):
    flags, x86 = CPUS[request.param]
    return fake_cpu(*flags, x86_64=x86)


def needs_compiler(cpu: CpuFeatures):
    """Where a kernel is available on ``cpu``, building it needs a C compiler on the host."""
    if cpu.avx2 and cpu_build._compiler() is None:
        pytest.skip("no C compiler here: every kernel reports that instead")


def conv(dtype: torch.dtype) -> nn.Conv2d:
    return nn.Conv2d(64, 64, 3, padding=1).to(dtype).requires_grad_(False)


@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


def decide(pipe, times: dict[str, float], **passes) -> dispatch.Timer:
    """Optimize with a fake timer reporting ``times`` (seconds by candidate name) and a fresh cache; the timer."""
    timer = dispatch.fixed_timer(times)
    with dispatch.using(timer=timer, cache=dispatch.DispatchCache(None)):
        optim.optimize(pipe, level=0, **passes)
    return timer


def dtypes_run(cpu: CpuFeatures) -> list[dict]:
    """The precision settings a pipeline runs in on ``cpu``: fp32 everywhere, bf16 where it is native."""
    return [{}] + ([{"precision": True}] if cpu.avx512_bf16 or cpu.amx else [])


def test_flag_sets_name_known_flags_only():
    assert CpuFeatures.of("avx512", "amx").flags() == ("avx2", "avx512", "amx")  # AVX2 comes with AVX-512
    assert CpuFeatures.of("avx512", "amx").without("amx") == CpuFeatures.of("avx512")
    assert CpuFeatures.of("avx2").flags() == ("avx2",) and CpuFeatures.of("avx2").describe() == "avx2"
    assert CpuFeatures.of().describe() == "no AVX2" and CpuFeatures(x86_64=False).describe() == "not x86-64"
    with pytest.raises(ValueError, match=r"unknown CPU flag\(s\) \['avx512bf16'\]; known: avx2, avx512, avx512_bf16, amx"):
        CpuFeatures.of("avx512bf16")


def test_assumed_flags_end_with_the_block_and_the_host_is_read_again():
    host = cpu_features.host()
    with cpu_features.assumed(CpuFeatures(x86_64=False)):
        assert cpu_features.current() == CpuFeatures(x86_64=False)
        assert "x86-64" in cpu_build.machine_reason()
    assert cpu_features.current() == host


def test_kernel_availability_and_reasons(cpu):
    needs_compiler(cpu)
    bf16_why, fp32_why = cpu_build.machine_reason(bf16=True), cpu_build.machine_reason(bf16=False)
    avx2_why = cpu_build.machine_reason(needs="avx2")
    if not cpu.x86_64:
        assert "for x86-64" in bf16_why and "for x86-64" in fp32_why and "for x86-64" in avx2_why
    else:
        assert (bf16_why is None) == cpu.avx512_bf16 and (fp32_why is None) == cpu.avx512
        assert (avx2_why is None) == cpu.avx2
        assert bf16_why in (None, "this CPU has no AVX512-BF16")
        assert fp32_why in (None, "this CPU has no AVX-512")
        assert avx2_why in (None, "this CPU has no AVX2")
    # every kernel agrees with the machine: bf16 ones need AVX512-BF16, fp32 ones AVX-512
    from runtime.kernels.attention_cpu import cpu_attention_ready
    from runtime.kernels.geglu_cpu import cpu_geglu_ready
    from runtime.kernels.group_norm_cpu import cpu_group_norm_ready
    from runtime.kernels.linear_geglu_cpu import cpu_linear_geglu_ready

    for ready, why in [(cpu_attention_ready(BF16), bf16_why), (cpu_attention_ready(FP32), fp32_why),
                       (cpu_geglu_ready(), bf16_why), (cpu_group_norm_ready(), bf16_why),
                       (cpu_linear_geglu_ready(BF16), bf16_why), (cpu_linear_geglu_ready(FP32), fp32_why),
                       (kernel_ready(BF16), bf16_why)]:
        assert ready == why
    # fp32 Winograd has an AVX2 sibling: it runs wherever AVX2 does (the AVX-512 kernel where that runs too)
    assert kernel_ready(FP32) == (None if fp32_why is None else avx2_why)


def test_bf16_precision_where_the_cpu_computes_it_natively(cpu):
    dtype, why = hardware.fast_half_dtype(CPU)
    native = cpu.avx512_bf16 or cpu.amx
    assert hardware.cpu_has_native_bf16() == native
    assert dtype == (BF16 if native else None)
    assert ("has native bf16" if native else "no native bf16") in why


@pytest.mark.parametrize("winner", ["ours", "sdpa"])
def test_attention_auto_takes_what_measures_faster(cpu, pipe, winner):
    needs_compiler(cpu)
    for settings in dtypes_run(cpu):
        timer = decide(pipe, {"ours": 1.0 if winner == "ours" else 3.0, "sdpa": 2.0}, attention=True, **settings)
        dtype = pipe.unet.dtype
        available = cpu.avx512_bf16 if dtype == BF16 else cpu.avx512
        modules = pipe.unet.attention_modules()
        want = OURS[dtype] if available and winner == "ours" else sdpa_backend
        assert modules and all(m.backend is want for m in modules)
        records = pipe.optimization.dispatch["attention"]
        assert {m.key.op for m in records} == {"attention"}
        if available:  # both timed, the report says which won and by how much
            assert timer.calls and all(m.source == "measured" and m.choice == winner for m in records)
            assert f"-> {winner} (measured)" in pipe.optimization.notes["attention"]
        else:  # one candidate: nothing to time, and the kernel's reason is given
            assert timer.calls == [] and all(m.source == "only candidate" and m.choice == "sdpa" for m in records)
            assert "ours: " in pipe.optimization.notes["attention"]
        assert all(m.backend is sdpa_backend for m in pipe.text_encoder.attention_modules())  # not probed: as it was


def test_attention_forced_backends(cpu):
    needs_compiler(cpu)
    assert choose_backend("auto", CPU)[0] is None  # measured per module by the pass
    if cpu.avx512:  # "cpu" takes ours, AMX or not, without measuring
        assert choose_backend("cpu", CPU)[0] is cpu_backend
    else:
        with pytest.raises(OptimizationError, match="attention backend 'cpu' unavailable: "):
            choose_backend("cpu", CPU)
    assert choose_backend("sdpa", CPU)[0] is sdpa_backend


def test_winograd_takes_the_convolutions_it_can_run(cpu):
    needs_compiler(cpu)
    assert WinogradPass()._takes(conv(FP32)) == cpu.avx2  # AVX-512 kernel, else its AVX2 sibling
    assert WinogradPass()._takes(conv(BF16)) == cpu.avx512_bf16  # AMX or not: measurement decides
    assert not WinogradPass()._takes(nn.Conv2d(4, 64, 3, padding=1))  # too few input channels for any CPU


def test_winograd_takes_the_convolutions_that_measure_faster(cpu, pipe):
    needs_compiler(cpu)
    for settings in dtypes_run(cpu):
        eligible = [m for m in pipe.unet.modules() if isinstance(m, nn.Conv2d) and WinogradPass()._takes(m)]
        for winner, expect in [("winograd", True), ("direct", False)]:
            decide(pipe, {"winograd": 1.0 if winner == "winograd" else 3.0, "direct": 2.0, "fold": 2.0,
                          "nearest+conv": 2.0}, winograd=True, **settings)
            if not eligible:  # no kernel for this dtype here
                assert "winograd" in pipe.optimization.skipped
                continue
            assert all((entry(m, "winograd") is not None) == expect for m in eligible)
            assert f"-> {winner} (measured)" in pipe.optimization.notes["winograd"]
        if eligible:  # amx=True takes every one without timing
            timer = decide(pipe, {"winograd": 3.0, "direct": 1.0}, winograd={"amx": True}, **settings)
            assert timer.calls == [] and all(entry(m, "winograd") is not None for m in eligible)
            assert "(forced; amx=True)" in pipe.optimization.notes["winograd"]


def test_geglu_fuses_the_projections_that_measure_faster(cpu, pipe):
    needs_compiler(cpu)
    ready = {d for d, ok in [(BF16, cpu.avx512_bf16), (FP32, cpu.avx512)] if ok}
    assert set(GEGLUPass()._fused_dtypes()) == ready  # AMX or not: measurement decides
    for settings in dtypes_run(cpu):
        for winner in ("fused", "unfused"):
            decide(pipe, {"fused": 1.0 if winner == "fused" else 3.0, "unfused": 2.0}, geglu=True, **settings)
            modules = [m for m in pipe.unet.modules() if isinstance(m, GEGLU)]
            if pipe.unet.dtype not in ready:
                assert "geglu" in pipe.optimization.skipped
                continue
            assert modules and all((m.fused is not None) == (winner == "fused") for m in modules)
            assert f"-> {winner} (measured)" in pipe.optimization.notes["geglu"]
        if pipe.unet.dtype in ready:  # amx=True fuses without timing
            timer = decide(pipe, {"fused": 3.0, "unfused": 1.0}, geglu={"amx": True}, **settings)
            assert timer.calls == [] and all(m.fused is not None for m in modules)


def test_the_environment_can_take_flags_away_but_never_add_one(monkeypatch):
    monkeypatch.delenv(cpu_features.ENV, raising=False)
    real = cpu_features.host()
    if not real.x86_64:
        pytest.skip("not x86-64: no flags to take away")
    monkeypatch.setenv(cpu_features.ENV, "none")
    assert cpu_features.host() == CpuFeatures.of()
    assert cpu_build.machine_reason(bf16=False) == "this CPU has no AVX-512"
    monkeypatch.setenv(cpu_features.ENV, "avx2")
    assert cpu_features.host() == CpuFeatures.of(*(["avx2"] if real.avx2 else []))
    monkeypatch.setenv(cpu_features.ENV, "avx512, amx")  # each kept only where the host has it; AVX2 comes along
    assert cpu_features.host() == CpuFeatures.of(*(f for f in ("avx2", "avx512", "amx") if f in real.flags()))
    monkeypatch.setenv(cpu_features.ENV, "avx512bf16")
    with pytest.raises(ValueError, match=r"DIFFUSION_RUNTIME_CPU_FLAGS='avx512bf16': unknown CPU flag\(s\)"):
        cpu_features.host()
