"""LoRA adapters: files in every common format, plugged into the models' compute slots (docs/ARCHITECTURE.md §3).

Public helpers (imported on first use, so runtime/models can import ``runtime.lora.model_mixin``
without pulling the rest in): ``get_peft_model_state_dict``, ``lora_adapter_metadata``,
``StableDiffusionLoraLoaderMixin``, ``StableDiffusionXLLoraLoaderMixin``.
"""
from importlib import import_module

_LAZY = {
    "get_peft_model_state_dict": "runtime.lora.saving",
    "lora_adapter_metadata": "runtime.lora.saving",
    "StableDiffusionLoraLoaderMixin": "runtime.lora.pipeline_mixin",
    "StableDiffusionXLLoraLoaderMixin": "runtime.lora.pipeline_mixin",
    "LoraModelMixin": "runtime.lora.model_mixin",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime.lora' has no attribute {name!r}")


__all__ = sorted(_LAZY)
