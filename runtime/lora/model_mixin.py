"""LoRA methods of the models that take adapters (the UNet, the CLIP text encoders), diffusers' names.

A leaf module on purpose: runtime/models imports it to give its classes these methods, so it imports
nothing of the package at module level; each method imports its implementation
(runtime/lora/adapters.py, load.py, saving.py) when called.
"""
from __future__ import annotations

_DEFAULT = object()


class LoraModelMixin:
    """``load_lora_adapter``, ``set_adapters``, ``fuse_lora`` & co. on a model (diffusers' PeftAdapterMixin
    names; the transformers-style ``set_adapter`` / ``active_adapters`` / ``disable_adapters`` too)."""

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix=_DEFAULT, hotswap: bool = False,
                          **kwargs):
        """Load one adapter from a state dict, file, folder or hub id. ``prefix`` selects the keys of this
        model (default ``"unet"`` for a UNet, ``"text_encoder"`` for a text encoder; None: keys without a
        prefix). kwargs: ``adapter_name``, ``weight_name``, ``subfolder``, ``network_alphas``,
        ``metadata``, hub options. Returns the adapter's name (None if the source holds no key for it)."""
        from .load import load_lora_adapter
        from .state import natural_component

        if prefix is _DEFAULT:
            prefix = natural_component(self)
        return load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix, hotswap, **kwargs)

    def set_adapters(self, adapter_names, weights=None) -> None:
        """Activate ``adapter_names`` with ``weights`` (a number each, or diffusers' per-block dicts on a UNet)."""
        from .adapters import set_adapters

        set_adapters(self, adapter_names, weights)

    def set_adapter(self, adapter_name) -> None:
        """Activate ``adapter_name`` (a name or a list) keeping each adapter's weight (transformers' name)."""
        from .adapters import list_adapters, sync
        from .state import lora_state
        from runtime.models.errors import LoraError

        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in list_adapters(self)]
        if missing:
            raise LoraError(f"set_adapter: adapter(s) {missing} not loaded (loaded: {list_adapters(self)})")
        state = lora_state(self)
        state.active = list(dict.fromkeys(names))
        sync(self, state)

    def active_adapters(self) -> list[str]:
        from .adapters import active_adapters

        return active_adapters(self)

    def get_list_adapters(self) -> list[str]:
        from .adapters import list_adapters

        return list_adapters(self)

    @property
    def peft_config(self) -> dict:
        """``{adapter name: its LoRA config}``; absent (AttributeError) without adapters, as in diffusers."""
        from .adapters import list_adapters
        from .saving import lora_adapter_metadata

        names = list_adapters(self)
        if not names:
            raise AttributeError(f"{type(self).__name__} has no LoRA adapter (no peft_config)")
        return {n: lora_adapter_metadata(self, n) for n in names}

    def disable_lora(self) -> None:
        from .adapters import set_enabled

        set_enabled(self, False)

    def enable_lora(self) -> None:
        from .adapters import set_enabled

        set_enabled(self, True)

    disable_adapters = disable_lora
    enable_adapters = enable_lora

    def delete_adapters(self, adapter_names) -> None:
        from .adapters import delete_adapters

        delete_adapters(self, adapter_names)

    def delete_adapter(self, adapter_name) -> None:
        self.delete_adapters(adapter_name)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None) -> None:
        """Fuse adapters into the weights in place (a saved original is kept; ``unfuse_lora`` restores it)."""
        from .adapters import fuse

        fuse(self, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        from .adapters import unfuse

        unfuse(self)

    def unload_lora(self) -> None:
        """Every adapter off and gone; the model computes exactly what it did before the first load."""
        from .adapters import unload

        unload(self)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Adapters loaded from now on live in fixed-rank buffers of ``target_rank``: a ``hotswap=True`` load
        copies into them in place (no recompilation, no new shapes); a larger rank is an error."""
        from .adapters import enable_hotswap

        enable_hotswap(self, target_rank, check_compiled)

    def save_lora_adapter(self, save_directory, adapter_name: str | None = None, upcast_before_saving: bool = False,
                          safe_serialization: bool = True, weight_name: str | None = None):
        """Write one adapter (keys without prefix, its config as metadata) into ``save_directory``."""
        from .saving import get_peft_model_state_dict, write_lora_file

        layers = get_peft_model_state_dict(self, adapter_name)
        tensors = {k: (v.float() if upcast_before_saving else v) for k, v in layers.items()}
        config = layers.lora_metadata if safe_serialization else None
        return write_lora_file(save_directory, tensors, config, weight_name=weight_name,
                               safe_serialization=safe_serialization)
