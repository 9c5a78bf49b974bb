"""Read a LoRA state dict in any supported format into ``{component: {module_path: LoraLayer}}``.

Formats (docs/ARCHITECTURE.md, "LoRA"), told apart per key:

- PEFT / current diffusers: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``, components
  ``unet.``, ``text_encoder.``, ``text_encoder_2.``; alphas from the LoRA config in the safetensors
  metadata (``lora_adapter_metadata``) when present, else from ``network_alphas``.
- Older diffusers: ``...processor.to_q_lora.down.weight``, ``...lora_linear_layer.up.weight``,
  ``...lora.down.weight`` (runtime/lora/legacy.py). A file whose keys all lack a component prefix
  and all start like UNet paths (``down_blocks.``, ``mid_block.`` ...: the old attention-processor
  files) is read as the UNet's, as ``unet.load_lora_adapter(..., prefix=None)`` reads it; diffusers'
  pipeline-level ``load_lora_weights`` would skip such keys with a warning.
- Kohya / A1111: ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` names with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, diffusers' or SDXL's sgm UNet spelling,
  LoCon convolutions included (runtime/lora/kohya.py, runtime/lora/unet_names.py).

Module paths are diffusers' inside the UNet and transformers 4.x's inside a CLIP text encoder
(``text_model.encoder.layers.0.self_attn.q_proj``; files saved from transformers 5.x's flat
``CLIPTextModel`` lack ``text_model.`` and get it back).

Scale per module is ``alpha / rank``; a module with no alpha anywhere gets ``alpha = rank``. With
PEFT metadata the scale is PEFT's: ``alpha_pattern`` / ``lora_alpha`` (default 8) over the rank,
``use_rslora`` over its square root; a metadata rank that differs from the weights' is an error.
DoRA, LoHa, LoKr, CP-decomposed LoCon and LoRA biases are refused with a LoraError naming the key.

Where diffusers 0.42.1 reads a file differently (we follow Kohya / A1111 here):

- Kohya alphas that differ between modules: diffusers' alpha patterns for attention layers keep
  ``.processor.to_k_lora.down.weight`` in them, match nothing, and those layers get the file's most
  common alpha; a module with no alpha also gets that. Here each module has its own, or its rank.
- sgm names of an up block without attention (SD 1.x's layout): its upsampler is
  ``output_blocks.N.1.conv``, which diffusers maps to ``attentions``; here it maps through the config.
- ``dora_scale`` keys: diffusers drops them with a warning and loads the rest; here an error.

``parse_lora`` never mutates the state dict it is given and never copies or writes its tensors.

Public: ``parse_lora`` (a pipeline's file), ``parse_component`` (one model's, as
``load_lora_adapter(prefix=...)``), ``lora_family``, ``metadata_configs``, ``check_pair``; names out
for the saver: ``peft_key``, ``adapter_metadata``, ``to_peft``, ``to_kohya`` (and
``kohya.kohya_name``).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Mapping

import torch

from runtime.models.errors import LoraError

from . import kohya
from .legacy import refused, split_dotted
from .weights import LoraLayer, Parsed

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"
# first segments of diffusers UNet module paths (for files without a component prefix)
UNET_TOP = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding",
            "class_embedding", "encoder_hid_proj")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "_lora.down.", "_lora.up.", ".lora.down.",
                 ".lora.up.", ".lora_linear_layer.", "lora_magnitude_vector", ".dora_scale", ".hada_", ".lokr_",
                 ".lora_mid.")
_WHAT = {"unet": "UNet", "text_encoder": "CLIP text encoder", "text_encoder_2": "second CLIP text encoder"}
_PEFT_FIELDS = {"r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora", "target_modules"}


# ---- what a file looks like ---------------------------------------------------------------
def _is_lora_key(key: str) -> bool:
    return any(m in key for m in _LORA_MARKERS)


def _cross_dim_hint(state_dict: Mapping) -> str | None:
    """SD 1.x (768), SD 2.x (1024) or SDXL (2048) from a cross-attention key/value down's width."""
    for key, t in state_dict.items():
        if ("attn2" in key and ("to_k" in key or "to_v" in key) and ("lora_A" in key or "lora_down" in key
                                                                    or "_lora.down" in key or ".lora.down" in key)):
            width = int(t.shape[-1]) if isinstance(t, torch.Tensor) and t.ndim == 2 else None
            return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width)
    return None


def lora_family(state_dict: Mapping[str, Any]) -> str:
    """A short description of what a LoRA file looks like (for errors: "LoRA for another architecture")."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if not any(_is_lora_key(k) for k in keys):
        if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g", "string_to_token") for k in keys):
            return "textual inversion embedding (not a LoRA)"
        return "not a LoRA (no LoRA keys)"
    if any(".hada_" in k for k in keys):
        return "LyCORIS LoHa"
    if any(".lokr_" in k for k in keys):
        return "LyCORIS LoKr"
    names = {k.partition(".")[0] for k in keys}
    unet = [n[len("lora_unet_"):] for n in names if n.startswith("lora_unet_")]
    if unet or any(n.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for n in names):
        if any(n.startswith(("double_blocks", "single_blocks")) for n in unet):
            return "Flux transformer (Kohya)"
        if any(n.startswith("joint_blocks") for n in unet):
            return "SD3 transformer (Kohya)"
        if any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
            return "SDXL (Kohya, lora_te1_/lora_te2_)"
        if any(kohya.is_sgm_name(n) for n in unet):
            return "SDXL UNet (Kohya, sgm names)"
        if _cross_dim_hint(state_dict) == "SDXL":
            return "SDXL UNet (Kohya, diffusers names)"
        return "SD 1.x/2.x UNet (Kohya)"
    if any(n.startswith(("lora_transformer_", "lycoris_")) for n in names):
        return "Flux/SD3 transformer (Kohya)"
    heads = {k.split(".", 1)[0] for k in keys}
    if "transformer" in heads or any(".single_transformer_blocks." in k or "double_blocks." in k
                                     or "context_embedder" in k for k in keys):
        return "Flux/SD3 transformer (PEFT/diffusers)"
    if "diffusion_model" in heads:
        return "DiT transformer (diffusion_model. names: Wan/LTX/HiDream-style)"
    style = "older diffusers" if any(("_lora." in k or ".lora." in k or "lora_linear_layer" in k) for k in keys) \
        else "PEFT/diffusers"
    hint = _cross_dim_hint(state_dict)
    deep = any(re.search(r"\.transformer_blocks\.[2-9]\.", k) for k in keys)
    if "text_encoder_2" in heads or any("add_embedding." in k for k in keys) or hint == "SDXL" or deep:
        return f"SDXL ({style})"
    if hint in ("SD 1.x", "SD 2.x"):
        return f"{hint} ({style})"
    if "unet" in heads or heads & set(UNET_TOP):
        return f"SD/SDXL UNet ({style})"
    if heads & {"text_encoder"}:
        return f"CLIP text encoder ({style})"
    return f"unknown ({style})"


# ---- keys -> (component, module, part) -----------------------------------------------------
def _classify(key: Any, unet_config, family: str, bare_unet: bool) -> tuple[str, str, str]:
    if not isinstance(key, str):
        raise LoraError(f"LoRA state dict key {key!r} is not a string")
    refused(key)
    split = kohya.split_key(key)
    if split is not None:
        component, name, part = split
        module = kohya.unet_module(name, unet_config) if component == "unet" else kohya.text_module(name)
        if module is None:
            where = f"module of this {_WHAT[component]}" if component == "unet" and unet_config is not None \
                else f"{_WHAT[component]} module"
            raise LoraError(f"LoRA key {key!r} names no {where}; the file looks like: {family}")
        return component, module, part
    head, _, rest = key.partition(".")
    if head in COMPONENTS:
        component = head
    elif bare_unet:
        component, rest = "unet", key
    elif _is_lora_key(key):
        raise LoraError(f"LoRA key {key!r} is for {head!r}, not an SD/SDXL component ({', '.join(COMPONENTS)}) "
                        f"or Kohya name (lora_unet_, lora_te_, lora_te1_, lora_te2_); the file looks like: {family}")
    else:
        raise LoraError(f"key {key!r} is not a LoRA weight; the file looks like: {family}")
    got = split_dotted(rest, component)
    if got is None:
        raise LoraError(f"key {key!r} is not a LoRA weight (expected <module>.lora_A.weight / .lora_B.weight, an "
                        f"older diffusers name or .alpha); the file looks like: {family}")
    module, part, _ = got
    if component != "unet":
        module = kohya.clip_path(module)
    return component, module, part


def _scalar(key: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise LoraError(f"LoRA alpha {key!r} has shape {tuple(value.shape)}; expected one number")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoraError(f"LoRA alpha {key!r} is {value!r}; expected a finite number")
    return float(value)


# ---- the PEFT config in the metadata ------------------------------------------------------
def _check_config(where: str, config: dict) -> dict:
    def number(field, value, integer=False):
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or (integer and (value != int(value) or value <= 0)):
            raise LoraError(f"LoRA metadata {where}{field}={value!r}: expected "
                            + ("a positive integer" if integer else "a finite number"))

    if config.get("r") is not None:
        number("r", config["r"], integer=True)
    if config.get("lora_alpha") is not None:
        number("lora_alpha", config["lora_alpha"])
    for field in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise LoraError(f"LoRA metadata {where}{field}={patterns!r}: expected an object")
        for pattern, value in patterns.items():
            number(f"{field}[{pattern!r}]", value, integer=field == "rank_pattern")
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoraError(f"LoRA metadata {where}{field}: pattern {pattern!r} is not a regex: {e}") from e
    if config.get("use_dora"):
        raise LoraError(f"LoRA metadata {where}use_dora=true: DoRA is not supported")
    return config


def metadata_configs(metadata: Mapping[str, Any] | None) -> dict[str, dict]:
    """Per component, the PEFT LoRA config the metadata holds (``{}`` where it holds none).

    ``metadata`` is a safetensors header's metadata (``{"format": "pt", "lora_adapter_metadata":
    "<json>"}``) or that JSON already parsed. diffusers' ``save_lora_weights`` writes one config per
    component with its fields prefixed (``"unet.r"``, ``"unet.lora_alpha"``, ``"text_encoder.alpha_pattern"``
    ...); a model's ``save_lora_adapter`` writes one unprefixed config, which then applies to every
    component."""
    if not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        raise LoraError(f"LoRA metadata is a {type(metadata).__name__}; expected a mapping")
    if METADATA_KEY in metadata:
        raw = metadata[METADATA_KEY]
        if isinstance(raw, (str, bytes)):
            try:
                config = json.loads(raw)
            except ValueError as e:
                raise LoraError(f"LoRA metadata {METADATA_KEY!r} is not JSON: {e}") from e
        else:
            config = raw
        if not isinstance(config, Mapping):
            raise LoraError(f"LoRA metadata {METADATA_KEY!r} is not a JSON object: {raw!r:.80}")
    else:
        config = metadata
    per: dict[str, dict] = {}
    for key, value in config.items():
        prefix, _, field = str(key).partition(".")
        if field and prefix in COMPONENTS:
            per.setdefault(prefix, {})[field] = value
    if not per and _PEFT_FIELDS & set(config):
        per = {c: dict(config) for c in COMPONENTS}
        return {c: _check_config("", cfg) for c, cfg in per.items()}
    return {c: _check_config(f"{c}.", cfg) for c, cfg in per.items()}


def _pattern_value(patterns: dict | None, module: str):
    """PEFT's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _metadata_alpha(config: dict, component: str, module: str, rank: int) -> float:
    """The alpha that gives ``alpha / rank`` = PEFT's scale for this module under ``config``."""
    r = _pattern_value(config.get("rank_pattern"), module) or config.get("r")
    if r is not None and int(r) != rank:
        raise LoraError(f"LoRA metadata gives {component}.{module} rank {int(r)}, but its weights have rank {rank}")
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", 8)  # PEFT's LoraConfig default
    alpha = float(alpha)
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)  # PEFT's scale alpha / sqrt(r), written as alpha' / rank
    return alpha


# ---- entry points -------------------------------------------------------------------------
def _bare_unet(state_dict: Mapping) -> bool:
    """True when no key has a component or Kohya prefix and every key starts like a UNet path."""
    return all(isinstance(k, str) and k.split(".", 1)[0] in UNET_TOP for k in state_dict)


def parse_lora(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping | None = None,
               metadata: Mapping[str, str] | None = None, network_alphas: Mapping[str, float] | None = None) -> Parsed:
    """Any supported format into ``{component: {module_path: LoraLayer}}`` (module docstring).

    ``unet_config`` (the UNet's config mapping) maps Kohya names through the UNet's real layout: it
    is needed for SDXL's sgm names and, when given, a Kohya UNet name must be one of its modules.
    ``metadata``: the safetensors metadata (``lora_adapter_metadata``). ``network_alphas``: alphas by
    key as diffusers' ``lora_state_dict`` returns them (``unet.<module>.alpha``, any spelling above).
    An alpha written in the file wins over the metadata, which wins over ``network_alphas``."""
    if not isinstance(state_dict, Mapping):
        raise LoraError(f"a LoRA state dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    if not state_dict:
        raise LoraError("the LoRA state dict is empty")
    family = lora_family(state_dict)
    if not any(isinstance(k, str) and _is_lora_key(k) for k in state_dict):
        some = ", ".join(repr(k) for k in list(state_dict)[:5])
        raise LoraError(f"no LoRA keys in this state dict ({len(state_dict)} keys: {some}"
                        f"{', ...' if len(state_dict) > 5 else ''}); it looks like: {family}")
    bare = _bare_unet(state_dict)
    slots: dict[tuple[str, str], dict[str, tuple[str, Any]]] = {}
    for key, value in state_dict.items():
        component, module, part = _classify(key, unet_config, family, bare)
        slot = slots.setdefault((component, module), {})
        if part in slot:
            raise LoraError(f"LoRA keys {slot[part][0]!r} and {key!r} both give the {part} of {component}.{module}")
        slot[part] = (key, value)

    configs = metadata_configs(metadata)
    alphas: dict[tuple[str, str], tuple[str, float]] = {}
    for key, value in (network_alphas or {}).items():
        name = key if str(key).endswith(".alpha") else f"{key}.alpha"
        component, module, part = _classify(name, unet_config, family, bare)
        alphas[(component, module)] = (key, value)

    parsed: Parsed = {}
    for (component, module), slot in slots.items():
        if "down" not in slot or "up" not in slot:
            missing = "up" if "down" in slot else "down"
            some = next(iter(slot.values()))[0]
            raise LoraError(f"LoRA layer {component}.{module} (key {some!r}) has no {missing} weight")
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        for k, t in ((down_key, down), (up_key, up)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise LoraError(f"LoRA weight {k!r} is {type(t).__name__}"
                                f"{'' if not isinstance(t, torch.Tensor) else ' of ' + str(t.dtype)}; "
                                "expected a floating-point tensor")
        layer = LoraLayer(down=down, up=up, key=down_key)
        check_pair(f"{component}.{module} ({down_key!r})", layer)
        if "alpha" in slot:
            layer.alpha = _scalar(*slot["alpha"])
        elif component in configs:
            layer.alpha = _metadata_alpha(configs[component], component, module, layer.rank)
        elif (component, module) in alphas:
            layer.alpha = _scalar(*alphas[(component, module)])
        parsed.setdefault(component, {})[module] = layer
    return parsed


def parse_component(state_dict: Mapping[str, torch.Tensor], component: str = "unet", prefix: str | None = None,
                    unet_config: Mapping | None = None, metadata: Mapping[str, Any] | None = None,
                    network_alphas: Mapping[str, float] | None = None) -> dict[str, LoraLayer]:
    """One model's layers, as ``<model>.load_lora_adapter(state_dict, prefix=...)`` reads them.

    ``prefix`` given: only keys starting with ``prefix.`` count, with it stripped (so do metadata
    and alpha keys); None: the keys are that model's module paths (or Kohya names). ``{}`` when no
    key is for this model (diffusers warns and loads nothing)."""
    if component not in COMPONENTS:
        raise LoraError(f"no LoRA component {component!r}; expected one of {', '.join(COMPONENTS)}")

    def strip(d):
        if d is None or prefix is None:
            return d
        return {k[len(prefix) + 1:]: v for k, v in d.items() if isinstance(k, str) and k.startswith(prefix + ".")}

    keys = strip(state_dict)
    if not keys:
        return {}
    own = {(k if kohya.split_key(k) is not None else f"{component}.{k}"): v for k, v in keys.items()}
    if metadata and METADATA_KEY not in metadata and prefix is not None:
        metadata = strip(metadata)
    alphas = strip(network_alphas)
    if alphas:
        alphas = {(k if kohya.split_key(k) is not None else f"{component}.{k}"): v for k, v in alphas.items()}
    parsed = parse_lora(own, unet_config=unet_config, metadata=metadata, network_alphas=alphas)
    others = set(parsed) - {component}
    if others:
        raise LoraError(f"LoRA keys for {', '.join(sorted(others))} given for the {component} alone")
    return parsed.get(component, {})


def check_pair(name: str, layer: LoraLayer) -> None:
    """Shapes of a down/up pair that fit each other (the model's shapes are checked at load)."""
    down, up = layer.down, layer.up
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraError(f"LoRA layer {name}: down {tuple(down.shape)} / up {tuple(up.shape)} are not a linear "
                        "(2-D) or convolution (4-D) pair")
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"LoRA layer {name}: up {tuple(up.shape)} has rank {up.shape[1]}, down "
                        f"{tuple(down.shape)} has rank {down.shape[0]}")
    if down.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraError(f"LoRA layer {name}: a convolution's up must be 1x1, got {tuple(up.shape)}")


# ---- names out (for the saver) ------------------------------------------------------------
def peft_key(component: str, module: str, part: str) -> str:
    """``unet.<module>.lora_A.weight`` (part ``down``) / ``.lora_B.weight`` (``up``): diffusers' names."""
    if part not in ("down", "up"):
        raise LoraError(f"peft_key: part {part!r} is not 'down' or 'up'")
    return f"{component}.{module}.lora_{'A' if part == 'down' else 'B'}.weight"


def _pattern(component: str, module: str) -> str:
    """A PEFT pattern / target naming exactly ``module``: ``^<path>`` in the UNet; in a text encoder
    the path from ``encoder.`` on, which matches with and without the ``text_model`` level
    (transformers 5.x's flat CLIPTextModel, whose keys diffusers strips of ``text_model.``)."""
    if component == "unet":
        return f"^{module}"
    return module.removeprefix("text_model.")


def adapter_metadata(parsed: Parsed) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` config diffusers reads back to the same scales: per component
    ``r`` / ``lora_alpha`` (the most common), ``rank_pattern`` / ``alpha_pattern`` (the others) and
    ``target_modules``, with the component prefix on each field (``"unet.r"``)."""
    out: dict[str, Any] = {}
    for component, layers in parsed.items():
        if not layers:
            continue
        ranks = {m: layer.rank for m, layer in layers.items()}
        alphas = {m: (float(layer.alpha) if layer.alpha is not None else float(layer.rank)) for m, layer in layers.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        out[f"{component}.r"] = r
        out[f"{component}.lora_alpha"] = alpha
        out[f"{component}.rank_pattern"] = {_pattern(component, m): v for m, v in ranks.items() if v != r}
        out[f"{component}.alpha_pattern"] = {_pattern(component, m): v for m, v in alphas.items() if v != alpha}
        out[f"{component}.target_modules"] = sorted(_pattern(component, m).lstrip("^") for m in layers)
    return out


def to_peft(parsed: Parsed) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, safetensors metadata)`` in the PEFT / current diffusers format."""
    state: dict[str, torch.Tensor] = {}
    for component, layers in parsed.items():
        for module, layer in layers.items():
            state[peft_key(component, module, "down")] = layer.down
            state[peft_key(component, module, "up")] = layer.up
    meta = {"format": "pt", METADATA_KEY: json.dumps(adapter_metadata(parsed), indent=2, sort_keys=True)}
    return state, meta


def to_kohya(parsed: Parsed, unet_config: Mapping | None = None, sgm: bool = False) -> dict[str, torch.Tensor]:
    """The Kohya format: ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (alpha = rank
    where none was given); ``sgm=True`` writes SDXL's layout (needs ``unet_config``)."""
    state: dict[str, torch.Tensor] = {}
    for component, layers in parsed.items():
        for module, layer in layers.items():
            name = kohya.kohya_name(component, module, unet_config, sgm)
            state[f"{name}.lora_down.weight"] = layer.down
            state[f"{name}.lora_up.weight"] = layer.up
            state[f"{name}.alpha"] = torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))
    return state
