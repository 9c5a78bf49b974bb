"""From a LoRA source to attached adapters: fetch, parse (runtime/lora/formats.py), resolve, attach."""
from __future__ import annotations

import json
import logging
from typing import Mapping

from torch import nn

from runtime.models.errors import LoraError

from .adapters import attach
from .files import check_lora_keys, fetch
from .resolve import resolve_layers
from .state import natural_component

logger = logging.getLogger(__name__)

HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
IGNORED_OPTIONS = ("low_cpu_mem_usage", "_pipeline", "return_lora_metadata")


def as_file_metadata(metadata) -> Mapping[str, str] | None:
    """diffusers' ``metadata=`` (a LoraConfig dict) in the form the parser reads from safetensors files."""
    from .formats import METADATA_KEY

    if metadata is None:
        return None
    if isinstance(metadata, Mapping) and METADATA_KEY in metadata:
        return metadata
    if not isinstance(metadata, Mapping):
        raise LoraError(f"metadata must be a dict (a LoRA config), got {type(metadata).__name__}")
    return {METADATA_KEY: json.dumps(dict(metadata))}


def split_options(kwargs: dict, what: str) -> tuple[dict, dict]:
    """(hub options, file options) out of ``kwargs``; an unknown keyword is an error naming it."""
    hub = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    files = {k: kwargs.pop(k) for k in ("weight_name", "subfolder", "use_safetensors") if k in kwargs}
    for k in IGNORED_OPTIONS:
        kwargs.pop(k, None)
    if kwargs:
        raise LoraError(f"{what}: unexpected keyword argument(s) {', '.join(sorted(kwargs))}")
    return hub, files


def parse_for(model: nn.Module, state_dict: Mapping, prefix: str | None, metadata, network_alphas,
              unet_config=None) -> tuple[str, dict, dict]:
    """``(component, {module path: LoraLayer}, the state dict as parsed)`` for the part ``prefix`` names."""
    from .formats import COMPONENTS, parse_lora

    natural = natural_component(model)
    if prefix is None:  # keys name the model's modules directly (or are Kohya names, which say whose)
        from .kohya import split_key

        def own(k):
            return k if split_key(k) is not None else f"{natural}.{k}"

        state_dict = {own(k): v for k, v in state_dict.items()}
        if network_alphas:
            network_alphas = {own(k): v for k, v in network_alphas.items()}
        component = natural
    elif prefix in COMPONENTS:
        component = prefix
    else:  # a prefix of the caller's own: those keys, named as the model's component
        start = prefix + "."
        state_dict = {natural + k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(start)}
        if network_alphas:
            network_alphas = {natural + k[len(prefix):]: v for k, v in network_alphas.items() if k.startswith(start)}
        component = natural
        if not state_dict:
            return component, {}, state_dict
    parsed = parse_lora(state_dict, unet_config=unet_config, metadata=metadata, network_alphas=network_alphas)
    return component, parsed.get(component, {}), state_dict


def load_lora_adapter(model: nn.Module, source, prefix: str | None = "unet", hotswap: bool = False, *,
                      adapter_name: str | None = None, network_alphas=None, metadata=None, **kwargs) -> str | None:
    """The model-level ``load_lora_adapter``; returns the adapter name (None: no keys for this model)."""
    hub, files = split_options(kwargs, "load_lora_adapter")
    if network_alphas and metadata:
        raise LoraError("load_lora_adapter: pass network_alphas or metadata, not both")
    state_dict, file_metadata, where = fetch(source, **files, **hub)
    check_lora_keys(state_dict, where)
    meta = as_file_metadata(metadata) if metadata is not None else file_metadata
    unet_config = getattr(model, "config", None) if natural_component(model) == "unet" else None
    component, layers, parsed_from = parse_for(model, state_dict, prefix, meta, network_alphas, unet_config)
    if not layers:
        logger.warning("No LoRA keys for the %s (%s) found with prefix=%r in %s; nothing loaded (pass prefix=None "
                       "for keys without one)", component, type(model).__name__, prefix, where)
        return None
    resolved = resolve_layers(model, component, layers, state_dict=parsed_from, source=where)
    return attach(model, resolved, adapter_name, hotswap=hotswap, source=where, component=component)
