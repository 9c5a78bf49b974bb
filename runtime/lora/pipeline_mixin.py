"""diffusers' LoRA API on the Stable Diffusion pipelines (``StableDiffusionLoraLoaderMixin`` and the SDXL one).

The pipeline's LoRA-loadable components are its ``unet``, ``text_encoder`` and (SDXL)
``text_encoder_2``; a file's ``<component>.`` keys go to the component of that name. Semantics follow
diffusers where it is silent otherwise: the adapter loaded last is the active one, ``set_adapters``
expands per-component and per-block weights as diffusers does, ``fuse_lora(lora_scale=s)`` keeps the
active adapters' scaling multiplied by ``s`` as peft does. Where this differs from diffusers, it says so:

- ``unfuse_lora`` (and ``delete_adapters`` / ``unload_lora_weights`` / ``disable_lora`` on fused adapters)
  copies the saved original weights back: bit for bit, where diffusers subtracts and drifts; unloading a
  fused adapter gives the base model back (diffusers keeps it fused in the weights).
- hotswapping also works for the text encoders.
- the call-time scale (``cross_attention_kwargs={"scale": s}``) is per thread, and never changes the
  adapters' stored scaling (diffusers multiplies and divides it back; after a call with scale 0 it
  resets every active adapter's weight to 1.0).
- per-block weights give layers too near the root for diffusers' rule (``conv_in``, ``conv_out``,
  ``time_embedding.*``) the weight 1.0, where diffusers raises an IndexError.

Loading, activating, fusing and deleting change shared state: do them between calls, not while another
thread runs the pipeline (as in diffusers). Concurrent calls themselves are fine, each with its own scale.
"""
from __future__ import annotations

import copy
import logging
import threading
import warnings

from runtime.models.errors import LoraError

logger = logging.getLogger(__name__)

_LOADABLE = ("unet", "text_encoder", "text_encoder_2")


class StableDiffusionLoraLoaderMixin:
    """LoRA loading, activation, fusion and saving on a pipeline (see the module docstring)."""

    unet_name = "unet"
    text_encoder_name = "text_encoder"

    # ---- what the pipeline holds -------------------------------------------------------------
    @property
    def _lora_loadable_modules(self) -> list[str]:
        return [n for n in _LOADABLE if n in type(self).component_names]

    def _lora_models(self):
        for name in self._lora_loadable_modules:
            model = getattr(self, name, None)
            if model is not None:
                yield name, model

    @property
    def lora_scale(self) -> float:
        """The call-time scale of the last (or running) call on this thread; 1.0 before any."""
        local = self.__dict__.get("_lora_call")
        return getattr(local, "scale", 1.0) if local is not None else 1.0

    def _set_call_lora_scale(self, scale: float | None) -> None:
        local = self.__dict__.setdefault("_lora_call", threading.local())
        local.scale = 1.0 if scale is None else float(scale)

    @property
    def fused_loras(self) -> set[str]:
        from .adapters import fused_adapters

        out: set[str] = set()
        for _, model in self._lora_models():
            out |= fused_adapters(model)
        return out

    @property
    def num_fused_loras(self) -> int:
        return len(self.fused_loras)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """``(state_dict, network_alphas)`` as diffusers returns them (``return_lora_metadata=True``: and the
        LoRA config stored in the file). PEFT / diffusers files come back as they are with no alphas; other
        formats (through runtime/lora/formats.py) as PEFT keys with ``<component>.<module>.alpha`` alphas."""
        import json

        from .files import fetch
        from .formats import METADATA_KEY, parse_lora
        from .load import split_options

        unet_config = kwargs.pop("unet_config", None)
        return_metadata = kwargs.pop("return_lora_metadata", False)
        hub, files = split_options(kwargs, "lora_state_dict")
        state_dict, file_metadata, _ = fetch(pretrained_model_name_or_path_or_dict, **files, **hub)
        metadata = None
        if file_metadata and METADATA_KEY in file_metadata:
            try:
                metadata = json.loads(file_metadata[METADATA_KEY])
            except ValueError as e:
                raise LoraError(f"LoRA metadata {METADATA_KEY!r} is not JSON: {e}") from e
        network_alphas = None
        peft = all(k.split(".", 1)[0] in _LOADABLE and (".lora_A." in k or ".lora_B." in k) for k in state_dict)
        if state_dict and not peft:
            parsed = parse_lora(state_dict, unet_config=unet_config, metadata=file_metadata)
            state_dict, network_alphas = {}, {}
            for component, layers in parsed.items():
                for path, layer in layers.items():
                    state_dict[f"{component}.{path}.lora_A.weight"] = layer.down
                    state_dict[f"{component}.{path}.lora_B.weight"] = layer.up
                    if layer.alpha is not None:
                        network_alphas[f"{component}.{path}.alpha"] = float(layer.alpha)
            network_alphas = network_alphas or None
        if return_metadata:
            return state_dict, network_alphas, metadata
        return state_dict, network_alphas

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                          adapter_name: str | None = None, hotswap: bool = False, **kwargs):
        """Load a LoRA (a file, a folder — ``pytorch_lora_weights.safetensors`` by default —, a hub id, or a
        state dict, which is never changed) into the UNet and text encoders, as adapter ``adapter_name``
        (default ``default_<n>``); it becomes the active adapter. ``hotswap=True`` replaces the weights of
        the loaded adapter of that name in place. kwargs: ``subfolder``, ``use_safetensors``,
        ``network_alphas``, hub options (``revision``, ``cache_dir``, ``token``, ...)."""
        from .adapters import attach, check_attach, delete_adapters
        from .files import check_lora_keys, fetch
        from .formats import parse_lora
        from .load import split_options
        from .resolve import resolve_layers

        network_alphas = kwargs.pop("network_alphas", None)
        hub, files = split_options(kwargs, "load_lora_weights")
        if weight_name is not None:
            files["weight_name"] = weight_name
        state_dict, metadata, where = fetch(pretrained_model_name_or_path_or_dict, **files, **hub)
        check_lora_keys(state_dict, where)
        unet = getattr(self, "unet", None)
        parsed = parse_lora(state_dict, unet_config=getattr(unet, "config", None), metadata=metadata,
                            network_alphas=network_alphas)
        models = dict(self._lora_models())
        ignored = [c for c in parsed if c not in models and parsed[c]]
        if ignored:
            logger.warning("load_lora_weights: %s holds LoRA layers for %s, which this %s lacks; they are ignored",
                           where, ", ".join(ignored), type(self).__name__)
        plan = []
        for component, model in models.items():
            layers = parsed.get(component)
            if layers:
                plan.append((component, model, resolve_layers(model, component, layers, state_dict=state_dict,
                                                              source=where)))
        if not plan:
            raise LoraError(f"{where}: no LoRA layer for this pipeline's {', '.join(models)} "
                            f"(the file's layers are for {', '.join(parsed) or 'nothing'})")
        for component, model, resolved in plan:  # every refusal before any change: a load is all or nothing
            check_attach(model, resolved, adapter_name, hotswap=hotswap, component=component)
        done = []
        try:
            for component, model, resolved in plan:
                name = attach(model, resolved, adapter_name, hotswap=hotswap, source=where, component=component)
                done.append((model, name))
        except BaseException:
            if not hotswap:  # a load is all or nothing
                for model, name in done:
                    delete_adapters(model, [name])
            raise

    @classmethod
    def load_lora_into_unet(cls, state_dict, network_alphas, unet, adapter_name=None, _pipeline=None,
                            low_cpu_mem_usage=False, hotswap: bool = False, metadata=None):
        """diffusers' classmethod: the ``unet.`` part of ``state_dict`` into ``unet``."""
        unet.load_lora_adapter(state_dict, prefix=cls.unet_name, network_alphas=network_alphas,
                               adapter_name=adapter_name, metadata=metadata, hotswap=hotswap)

    @classmethod
    def load_lora_into_text_encoder(cls, state_dict, network_alphas, text_encoder, prefix=None, lora_scale=1.0,
                                    adapter_name=None, _pipeline=None, low_cpu_mem_usage=False,
                                    hotswap: bool = False, metadata=None):
        """diffusers' classmethod: the ``text_encoder.`` part (or ``prefix``'s) of ``state_dict``."""
        text_encoder.load_lora_adapter(state_dict, prefix=prefix or cls.text_encoder_name,
                                       network_alphas=network_alphas, adapter_name=adapter_name,
                                       metadata=metadata, hotswap=hotswap)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Fixed-rank buffers (``target_rank``) for the adapters loaded from now on; call before the first load."""
        from .adapters import enable_hotswap

        for component, model in self._lora_models():
            enable_hotswap(model, target_rank, check_compiled, component)

    # ---- activity and weights ------------------------------------------------------------------
    def get_list_adapters(self) -> dict[str, list[str]]:
        from .adapters import list_adapters

        return {c: list_adapters(m) for c, m in self._lora_models() if list_adapters(m)}

    def get_active_adapters(self) -> list[str]:
        from .adapters import active_adapters, list_adapters

        for _, model in self._lora_models():
            if list_adapters(model):
                return active_adapters(model)
        return []

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activate ``adapter_names`` with ``adapter_weights``: None (1.0), a number, a list (one per name), or
        a dict per component (``{"unet": {"down": 0.9, "mid": 1.0, "up": {...}}, "text_encoder": 0.5}``)."""
        from .adapters import set_adapters

        loadable = self._lora_loadable_modules
        if isinstance(adapter_weights, dict):
            invalid = sorted(set(adapter_weights) - set(loadable))
            if invalid:
                logger.warning("set_adapters: %s in adapter_weights are not LoRA components of this pipeline "
                               "(%s); their weights are ignored", invalid, loadable)
                adapter_weights = {k: v for k, v in adapter_weights.items() if k not in invalid}
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = copy.deepcopy(adapter_weights)
        if not isinstance(weights, list):
            weights = [weights] * len(names)  # one object for all names, as diffusers replicates it
        if len(names) != len(weights):
            raise LoraError(f"set_adapters: {len(names)} adapter name(s) but {len(weights)} weight(s)")
        listed = self.get_list_adapters()
        everything = {n for ns in listed.values() for n in ns}
        missing = sorted(set(names) - everything)
        if missing:
            raise LoraError(f"set_adapters: adapter name(s) {missing} are not loaded (loaded: {sorted(everything)})")
        for component, model in self._lora_models():
            per_component = []
            for name, w in zip(names, weights):
                if isinstance(w, dict):
                    part = w.pop(component, None)  # diffusers pops: a dict shared by several names serves one
                    if part is not None and name not in listed.get(component, []):
                        logger.warning("set_adapters: the weights for adapter %r name %s, which that adapter does "
                                       "not adapt; ignored", name, component)
                else:
                    part = w
                per_component.append(part)
            set_adapters(model, names, per_component, check=False, component=component)

    def disable_lora(self) -> None:
        from .adapters import set_enabled

        for component, model in self._lora_models():
            set_enabled(model, False, component)

    def enable_lora(self) -> None:
        from .adapters import set_enabled

        for component, model in self._lora_models():
            set_enabled(model, True, component)

    def delete_adapters(self, adapter_names) -> None:
        from .adapters import delete_adapters

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        found = set()
        for component, model in self._lora_models():
            found.update(delete_adapters(model, names, component))
        unknown = [n for n in names if n not in found]
        if unknown:
            logger.warning("delete_adapters: no adapter named %s in this pipeline", unknown)

    def unload_lora_weights(self) -> None:
        """Every adapter off and gone: the pipeline computes exactly what it did before the first load."""
        from .adapters import unload

        for component, model in self._lora_models():
            unload(model, component)

    def set_lora_device(self, adapter_names, device) -> None:
        """Move the named adapters' tensors to ``device`` (they are cast to each call's device anyway)."""
        from .adapters import set_device

        for _, model in self._lora_models():
            set_device(model, adapter_names, device)

    # ---- fusing --------------------------------------------------------------------------------------
    def _components_arg(self, components, what: str, kwargs: dict) -> list[str]:
        for old in ("fuse_unet", "fuse_text_encoder", "unfuse_unet", "unfuse_text_encoder"):
            if kwargs.pop(old, None) is not None:
                warnings.warn(f"{what}: {old} is deprecated and ignored; pass components=[...]", FutureWarning,
                              stacklevel=3)
        if kwargs:
            raise LoraError(f"{what}: unexpected keyword argument(s) {', '.join(sorted(kwargs))}")
        if components is None:
            components = list(self._lora_loadable_modules)
        components = [components] if isinstance(components, str) else list(components)
        if not components:
            raise LoraError(f"{what}: components cannot be an empty list")
        for c in components:
            if c not in self._lora_loadable_modules:
                raise LoraError(f"{what}: {c!r} is not a LoRA component of this pipeline ({self._lora_loadable_modules})")
        return components

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None,
                  **kwargs) -> None:
        """Fuse adapters (default: the active ones) into ``components``' weights in place, each adapter's
        delta times ``lora_scale``; ``safe_fusing=True`` refuses (before writing anything) a fuse that would
        give NaN/inf. The originals are kept: ``unfuse_lora`` restores them bit for bit."""
        from .adapters import fuse

        for component in self._components_arg(components, "fuse_lora", kwargs):
            model = getattr(self, component, None)
            if model is not None:
                fuse(model, lora_scale, safe_fusing, adapter_names, component)

    def unfuse_lora(self, components=None, **kwargs) -> None:
        """Copy the saved original weights back into ``components`` (bit for bit, any number of cycles)."""
        from .adapters import unfuse

        for component in self._components_arg(components, "unfuse_lora", kwargs):
            model = getattr(self, component, None)
            if model is not None:
                unfuse(model, component)

    # ---- saving --------------------------------------------------------------------------------------
    @classmethod
    def save_lora_weights(cls, save_directory, unet_lora_layers=None, text_encoder_lora_layers=None,
                          text_encoder_2_lora_layers=None, is_main_process: bool = True, weight_name: str | None = None,
                          save_function=None, safe_serialization: bool = True, unet_lora_adapter_metadata=None,
                          text_encoder_lora_adapter_metadata=None, text_encoder_2_lora_adapter_metadata=None):
        """Write a PEFT-format LoRA file diffusers loads (``pytorch_lora_weights.safetensors`` by default).

        Each ``*_lora_layers`` is a dict of tensors keyed as peft keys them (e.g. from
        ``runtime.lora.get_peft_model_state_dict(pipe.unet, "name")``, which also carries the adapter's config:
        it is written as ``lora_adapter_metadata`` unless ``*_lora_adapter_metadata`` is given)."""
        from .saving import pack, write_lora_file

        layers, metadata = {}, {}
        for prefix, part, meta in (("unet", unet_lora_layers, unet_lora_adapter_metadata),
                                   ("text_encoder", text_encoder_lora_layers, text_encoder_lora_adapter_metadata),
                                   ("text_encoder_2", text_encoder_2_lora_layers, text_encoder_2_lora_adapter_metadata)):
            if part:
                layers[prefix] = part
                metadata[prefix] = meta if meta is not None else getattr(part, "lora_metadata", None)
        if not layers:
            raise LoraError("save_lora_weights: pass at least one of unet_lora_layers, text_encoder_lora_layers or "
                            "text_encoder_2_lora_layers")
        if not safe_serialization:
            metadata = {}
        tensors, config = pack(layers, metadata)
        return write_lora_file(save_directory, tensors, config, weight_name=weight_name,
                               safe_serialization=safe_serialization, save_function=save_function,
                               is_main_process=is_main_process)


class StableDiffusionXLLoraLoaderMixin(StableDiffusionLoraLoaderMixin):
    """The SDXL pipelines' name for the same mixin (their third component, ``text_encoder_2``, is found by name)."""
