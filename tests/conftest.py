"""Shared fixtures: the tiny diffusers-built checkpoints (each built once per run), and one torch
thread per test process (tiny models run fastest so on the 2-core test machines)."""
import os

# Triton fixes its interpreter mode when first imported, and the kernel tests run it on CPU: set it
# before anything (torch's own Triton users included) can import triton (tests/kernels/conftest.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The derived-weight store (runtime/optim/derived_store.py) of this test run: a fresh folder, so no run
# reads copies an earlier one stored and the user's cache is left alone (subprocesses inherit it).
if "DIFFUSION_RUNTIME_DERIVED_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402

    os.environ["DIFFUSION_RUNTIME_DERIVED_DIR"] = tempfile.mkdtemp(prefix="dr-derived-")
    atexit.register(shutil.rmtree, os.environ["DIFFUSION_RUNTIME_DERIVED_DIR"], ignore_errors=True)

from pipeline_fixtures import (  # noqa: F401  (tests/ is on sys.path through this conftest)
    ddpm_folder,
    one_thread,
    sd_folder,
    sd_inpaint_folder,
    sdxl_folder,
)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ours_first(candidates):
    """A fake dispatch timer: every candidate but the eager one (the ``baseline``) reports faster."""
    return {c.name: 1.0 if c.baseline else 0.5 for c in candidates}


@pytest.fixture(autouse=True)
def _dispatch_without_timing():
    """``optimize`` times the implementations it chooses between (runtime/optim/dispatch.py). On shared
    test machines timings are noise and cost seconds, so every test decides with a fake timer that
    reports our kernels faster (what the pass tests check) and a cache in memory only, never the user's.
    Tests of the dispatch itself set their own timer and cache inside (tests/optim/test_dispatch.py)."""
    from runtime.optim import dispatch

    with dispatch.using(timer=ours_first, cache=dispatch.DispatchCache(None)):
        yield


@pytest.fixture
def fake_cpu():
    """``fake_cpu("avx512", "avx512_bf16", "amx")``: decide as on a CPU with exactly those flags until
    the test ends (runtime/kernels/cpu_features.py). For decision logic only where a flag is one the
    host lacks: a kernel built for it would not run here."""
    import contextlib

    from runtime.kernels import cpu_features

    with contextlib.ExitStack() as stack:
        def fake(*flags: str, x86_64: bool = True):
            return stack.enter_context(cpu_features.assumed(cpu_features.CpuFeatures.of(*flags, x86_64=x86_64)))

        yield fake


@pytest.fixture
def host_without_amx():
    """The host's own flags less AMX: for tests of what our bf16 kernels compute inside a pass, on the
    flags our kernels were written for (which implementation runs is measured, here with the fake timer
    of ``_dispatch_without_timing``). Every flag left is the host's, so the kernels run."""
    from runtime.kernels import cpu_features

    with cpu_features.assumed(cpu_features.host().without("amx")) as features:
        yield features


# The CPU kernel families (C sources in runtime/kernels/) and the flags each needs.
KERNEL_FAMILIES = {
    "attention_cpu": "attention bf16", "attention_f32_cpu": "attention fp32", "geglu_cpu": "GEGLU bf16",
    "group_norm_cpu": "GroupNorm+SiLU bf16", "group_norm_f32_cpu": "GroupNorm+SiLU fp32",
    "linear_geglu_cpu": "linear+GEGLU bf16",
    "linear_geglu_f32_cpu": "linear+GEGLU fp32", "lora_cpu": "LoRA term bf16", "lora_f32_cpu": "LoRA term fp32", "winograd_cpu": "Winograd bf16", "winograd_f32_cpu": "Winograd fp32",
    "winograd_f32_avx2_cpu": "Winograd fp32 AVX2",
}


def pytest_terminal_summary(terminalreporter):
    """One closing line: which of our CPU kernel families this run built, loaded and ran on this host."""
    import sys

    if "runtime.kernels.cpu_build" not in sys.modules:
        return
    from runtime.kernels import cpu_build, cpu_features

    ran = set(cpu_build.loaded_on_host())
    done = [label for stem, label in KERNEL_FAMILIES.items() if stem in ran]
    left = [label for stem, label in KERNEL_FAMILIES.items() if stem not in ran]
    host = cpu_features.host()
    why = [cpu_build.machine_reason(needs=needs) for needs in ("avx512_bf16", "avx512", "avx2")]
    reasons = sorted({r for r in why if r})
    terminalreporter.write_line(
        f"CPU kernels exercised on this host ({cpu_features.model_name()}; {host.describe()}): "
        f"{', '.join(done) or 'none'}" + (f"; not exercised: {', '.join(left)}" if left else "")
        + (f" ({'; '.join(reasons)})" if reasons and left else ""))
