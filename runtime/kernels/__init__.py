"""Triton kernels with pure-PyTorch references (Triton is an optional extra).

Each operation lives in its own file with its kernel, autotune configs, host wrapper, reference
``<op>_ref`` and custom-op registration (``torch.ops.diffusion_runtime.<op>``, traced by torch.compile):
``attention`` (flash-attention forward), ``group_norm`` (+ fused SiLU), ``geglu``. Importing
this package never needs Triton; without it every entry point raises ``TritonUnavailableError``
and ``triton_available()`` is False. The references always work.

``cpu_attention``, ``cpu_geglu`` and ``cpu_group_norm_silu`` are not Triton: C kernels (bf16 ones for CPUs
with AVX512-BF16, fp32 ones for any CPU with AVX-512), built with the system compiler on first use
(cpu_build.py says how and when they are
unavailable); cpu_features.py is where every CPU decision reads the host's flags.

Importing this package imports Triton and fixes its interpreter mode (availability.py), so code that
runs at ``import runtime`` imports it inside functions, not at module level.
"""
from .attention import attention, attention_ref, attention_supports
from .attention_cpu import cpu_attention, cpu_attention_ready, cpu_attention_supports
from .geglu_cpu import cpu_geglu, cpu_geglu_ready, cpu_geglu_supports
from .group_norm_cpu import cpu_group_norm_ready, cpu_group_norm_silu, cpu_group_norm_supports
from .availability import TritonUnavailableError, interpreter_mode, triton_available
from .geglu import geglu, geglu_activation, geglu_activation_supports, geglu_ref
from .group_norm import group_norm, group_norm_ref, group_norm_supports

__all__ = [
    "attention", "attention_ref", "attention_supports",
    "cpu_attention", "cpu_attention_ready", "cpu_attention_supports",
    "cpu_geglu", "cpu_geglu_ready", "cpu_geglu_supports",
    "cpu_group_norm_silu", "cpu_group_norm_ready", "cpu_group_norm_supports",
    "group_norm", "group_norm_ref", "group_norm_supports",
    "geglu", "geglu_activation", "geglu_activation_supports", "geglu_ref",
    "triton_available", "interpreter_mode", "TritonUnavailableError",
]
