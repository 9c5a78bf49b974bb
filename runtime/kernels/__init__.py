"""Triton kernels with pure-PyTorch references (Triton is an optional extra).

Each operation lives in its own file with its kernel, autotune configs, host wrapper, reference
``<op>_ref`` and custom-op registration (``torch.ops.diffusion_runtime.<op>``, traced by torch.compile):
``attention`` (flash-attention forward), ``group_norm`` (+ fused SiLU), ``geglu``. Importing
this package never needs Triton; without it every entry point raises ``TritonUnavailableError``
and ``triton_available()`` is False. The references always work.

``cpu_attention``, ``cpu_geglu`` and ``cpu_group_norm_silu`` are not Triton: C kernels for bf16 on CPUs
with AVX512-BF16, built with the system compiler on first use (cpu_build.py says how and when they are
unavailable); cpu_features.py is where every CPU decision reads the host's flags.

The names below are imported on first use, so importing one submodule (``runtime.kernels.cpu_features``)
neither imports Triton nor fixes its interpreter mode (availability.py).
"""
from importlib import import_module

_EXPORTS = {
    "attention": "attention", "attention_ref": "attention", "attention_supports": "attention",
    "cpu_attention": "attention_cpu", "cpu_attention_ready": "attention_cpu", "cpu_attention_supports": "attention_cpu",
    "cpu_geglu": "geglu_cpu", "cpu_geglu_ready": "geglu_cpu", "cpu_geglu_supports": "geglu_cpu",
    "cpu_group_norm_silu": "group_norm_cpu", "cpu_group_norm_ready": "group_norm_cpu",
    "cpu_group_norm_supports": "group_norm_cpu",
    "group_norm": "group_norm", "group_norm_ref": "group_norm", "group_norm_supports": "group_norm",
    "geglu": "geglu", "geglu_activation": "geglu", "geglu_activation_supports": "geglu", "geglu_ref": "geglu",
    "triton_available": "availability", "interpreter_mode": "availability",
    "TritonUnavailableError": "availability",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
