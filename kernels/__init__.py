"""Triton kernels with pure-PyTorch references (Triton is an optional extra).

Each operation lives in its own file with its kernel, autotune configs, host wrapper, reference
``<op>_ref`` and custom-op registration (``torch.ops.kernels.<op>``, traced by torch.compile):
``attention`` (flash-attention forward), ``group_norm`` (+ fused SiLU), ``geglu``. Importing
this package never needs Triton; without it every entry point raises ``TritonUnavailableError``
and ``triton_available()`` is False. The references always work.

``cpu_attention`` is not Triton: a C kernel for bf16 attention on CPUs with AVX512-BF16, built
with the system compiler on first use (attention_cpu.py says how and when it is unavailable).
"""
from .attention import attention, attention_ref, attention_supports
from .attention_cpu import cpu_attention, cpu_attention_ready, cpu_attention_supports
from .availability import TritonUnavailableError, interpreter_mode, triton_available
from .geglu import geglu, geglu_activation, geglu_activation_supports, geglu_ref
from .group_norm import group_norm, group_norm_ref, group_norm_supports

__all__ = [
    "attention", "attention_ref", "attention_supports",
    "cpu_attention", "cpu_attention_ready", "cpu_attention_supports",
    "group_norm", "group_norm_ref", "group_norm_supports",
    "geglu", "geglu_activation", "geglu_activation_supports", "geglu_ref",
    "triton_available", "interpreter_mode", "TritonUnavailableError",
]
