"""Read a LoRA state dict in any supported format into ``{component: {module_path: LoraLayer}}``.

Formats (docs/ARCHITECTURE.md, "LoRA"):

- PEFT / current diffusers: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``, components
  ``unet.``, ``text_encoder.``, ``text_encoder_2.``; alphas from the LoRA config in the safetensors
  metadata (``lora_adapter_metadata``) when present, else from ``network_alphas``.

``parse_lora`` never mutates the state dict it is given.
"""
from __future__ import annotations

import json
from typing import Mapping

import torch

from runtime.models.errors import LoraError

from .weights import LoraLayer, Parsed

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"


def _peft_alphas(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """Per component: {"lora_alpha": .., "r": .., "alpha_pattern": {..}} from the safetensors metadata."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    try:
        config = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError) as e:
        raise LoraError(f"LoRA metadata {METADATA_KEY!r} is not JSON: {e}") from e
    if not isinstance(config, dict):
        raise LoraError(f"LoRA metadata {METADATA_KEY!r} is not a JSON object")
    # diffusers writes one config per component, keyed by its prefix ("unet.r", ...), or one flat config
    per = {}
    for key, value in config.items():
        prefix, _, field = key.partition(".")
        if field and prefix in COMPONENTS:
            per.setdefault(prefix, {})[field] = value
    if not per:
        per = {c: config for c in COMPONENTS}
    return per


def _alpha_for(config: dict, module: str, rank: int) -> float | None:
    if not config:
        return None
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    if "lora_alpha" in config:
        return float(config["lora_alpha"])
    return None


def parse_peft(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               network_alphas: Mapping[str, float] | None = None) -> Parsed:
    """The PEFT / current diffusers format."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or ".lora_" not in rest:
            raise LoraError(f"LoRA key {key!r}: expected '<component>.<module>.lora_A.weight' or "
                            f"'.lora_B.weight' with a component in {', '.join(COMPONENTS)}")
        module, _, part = rest.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise LoraError(f"LoRA key {key!r}: unknown part 'lora_{part}'")
        pairs.setdefault((component, module), {})[part[0]] = tensor
    configs = _peft_alphas(metadata)
    parsed: Parsed = {}
    for (component, module), pair in pairs.items():
        missing = {"A", "B"} - set(pair)
        if missing:
            raise LoraError(f"LoRA layer {component}.{module} lacks lora_{missing.pop()}.weight")
        layer = LoraLayer(down=pair["A"], up=pair["B"])
        check_pair(f"{component}.{module}", layer)
        alpha = _alpha_for(configs.get(component, {}), module, layer.rank)
        if alpha is None and network_alphas:
            alpha = network_alphas.get(f"{component}.{module}.alpha", network_alphas.get(f"{component}.{module}"))
        layer.alpha = None if alpha is None else float(alpha)
        parsed.setdefault(component, {})[module] = layer
    return parsed


def check_pair(name: str, layer: LoraLayer) -> None:
    """Shapes of a down/up pair that fit each other (the model's shapes are checked at load)."""
    down, up = layer.down, layer.up
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraError(f"LoRA layer {name}: down {tuple(down.shape)} / up {tuple(up.shape)} are not a linear "
                        "(2-D) or convolution (4-D) pair")
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"LoRA layer {name}: up {tuple(up.shape)} does not take down's rank {down.shape[0]} "
                        f"(down {tuple(down.shape)})")
    if down.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraError(f"LoRA layer {name}: a convolution's up must be 1x1, got {tuple(up.shape)}")


def parse_lora(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping | None = None,
               metadata: Mapping[str, str] | None = None, network_alphas: Mapping[str, float] | None = None) -> Parsed:
    """Any supported format into ``{component: {module_path: LoraLayer}}``; ``unet_config`` maps Kohya/SGM names."""
    if not state_dict:
        raise LoraError("the LoRA state dict is empty")
    return parse_peft(state_dict, metadata, network_alphas)
