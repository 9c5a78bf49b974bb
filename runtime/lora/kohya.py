"""Kohya / A1111 LoRA names: ``lora_unet_<module>``, ``lora_te_<module>``, SDXL's ``lora_te1_`` / ``lora_te2_``.

A Kohya key is ``<lora name>.<part>``: the name is the prefix plus a module path with every ``.``
written as ``_``; the part is ``lora_down.weight``, ``lora_up.weight`` or ``alpha``. Recovering
the dots:

- With the UNet config: every targetable module of that UNet (runtime/lora/unet_names.py) is
  spelled both ways, diffusers' path (what Kohya's SD 1.x/2.x trainer writes, since it trains on
  diffusers' UNet) and the sgm path (what its SDXL trainer writes: ``input_blocks_4_1_...``,
  ``middle_block_1_...``, ``output_blocks_2_2_conv``, ``time_embed_0``, ``label_emb_0_0``,
  ``out_2``), so a name is looked up, not split.
- Without a config, diffusers-spelled UNet names are split by the grammar of diffusers' UNet paths
  (``_UNET`` below, then the multi-word segments of ``_SEGMENTS``); sgm names need the config (their
  block numbers depend on ``layers_per_block`` and which blocks have attention).
- Text encoder names follow transformers' CLIP paths: ``text_model.encoder.layers.N.self_attn.
  {q,k,v,out}_proj``, ``...mlp.fc1/fc2``, and ``text_projection`` (``text_model_`` may be absent,
  as transformers 5.x's flat ``CLIPTextModel`` names them; see ``clip_path``).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping

from runtime.models.errors import LoraError

from .unet_names import config_key, unet_modules

PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# parts of other (LyCORIS) networks that share the lora_ names: refused, naming the key
REFUSED_PARTS = {
    "dora_scale": "a DoRA magnitude (dora_scale); DoRA is not supported",
    "lora_mid.weight": "a LoCon CP-decomposed middle factor (lora_mid); only plain down/up pairs are supported",
    "hada_": "a LoHa factor; LoHa is not supported",
    "lokr_": "a LoKr factor; LoKr is not supported",
    "diff": "a full weight difference (diff); only low-rank down/up pairs are supported",
    "diff_b": "a bias difference (diff_b); only low-rank down/up pairs are supported",
    "bias_indices": "a sparse bias (bias_indices); not supported",
    "bias_values": "a sparse bias (bias_values); not supported",
    "bias_size": "a sparse bias (bias_size); not supported",
}

_RES = r"(?:conv1|conv2|time_emb_proj|conv_shortcut)"
_ATT = r"(?:proj_in|proj_out|transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
_UNET = re.compile(
    r"(?:conv_in|conv_out|time_embedding_(?:linear_[12]|cond_proj)|(?:add|class)_embedding_linear_[12]|encoder_hid_proj"
    rf"|(?:down|up)_blocks_\d+_(?:resnets_\d+_{_RES}|attentions_\d+_{_ATT}|(?:down|up)samplers_0_conv)"
    rf"|mid_block_(?:resnets_\d+_{_RES}|attentions_0_{_ATT}))"
)
_TEXT = re.compile(r"(?:text_model_)?encoder_layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])|text_projection")
_SGM = re.compile(r"(?:input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")
# the segments of diffusers' / transformers' paths that hold an underscore, longest first
_SEGMENTS = sorted({"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                    "proj_in", "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding",
                    "add_embedding", "class_embedding", "linear_1", "linear_2", "cond_proj", "encoder_hid_proj",
                    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection"},
                   key=lambda s: -s.count("_"))


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(component, name, part)`` of a Kohya key (``name`` without its prefix), or None if it has no
    Kohya prefix. Raises LoraError for a part of another network type (DoRA, LoHa, LoKr, ...)."""
    for prefix, component in PREFIXES.items():
        if key.startswith(prefix):
            break
    else:
        return None
    name, _, part = key.partition(".")
    for refused, why in REFUSED_PARTS.items():
        if part == refused or (refused.endswith("_") and part.startswith(refused)):
            raise LoraError(f"LoRA key {key!r} is {why}")
    if part not in PARTS:
        raise LoraError(f"LoRA key {key!r}: unknown Kohya part {part!r} (expected lora_down.weight, "
                        "lora_up.weight or alpha)")
    return component, name[len(prefix):], PARTS[part]


def _dotted(name: str) -> str:
    """Underscores back to dots, keeping the multi-word segments of ``_SEGMENTS`` whole."""
    words, out, i = name.split("_"), [], 0
    while i < len(words):
        for segment in _SEGMENTS:
            n = segment.count("_") + 1
            if "_".join(words[i:i + n]) == segment:
                out.append(segment)
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


@lru_cache(maxsize=16)
def _unet_table(frozen: tuple) -> dict[str, str]:
    table = {}
    for name, sgm in unet_modules(dict(frozen)).items():
        table[name.replace(".", "_")] = name
        if sgm is not None:
            table[sgm.replace(".", "_")] = name
    return table


def unet_table(unet_config: Mapping | Any) -> dict[str, str]:
    """``{Kohya name (no prefix): diffusers module path}`` for this UNet, diffusers and sgm spellings."""
    return _unet_table(config_key(unet_config))


def is_sgm_name(name: str) -> bool:
    return bool(_SGM.match(name))


def unet_module(name: str, unet_config: Mapping | Any | None = None) -> str | None:
    """The diffusers module path of a Kohya UNet name (prefix stripped), or None if it names none.

    Raises LoraError for an sgm name without a config (its block numbers cannot be read alone)."""
    if unet_config is not None:
        return unet_table(unet_config).get(name)
    if is_sgm_name(name):
        raise LoraError(f"LoRA name 'lora_unet_{name}' uses the sgm (original SDXL UNet) layout, whose block "
                        "numbers map to diffusers' only through the UNet config; pass unet_config")
    return _dotted(name) if _UNET.fullmatch(name) else None


def text_module(name: str) -> str | None:
    """The transformers CLIP module path of a Kohya text-encoder name (prefix stripped), or None."""
    return clip_path(_dotted(name)) if _TEXT.fullmatch(name) else None


def clip_path(module: str) -> str:
    """A CLIP text-encoder module path in our (and transformers 4.x's) layout, ``text_model.encoder...``.

    transformers 5.x builds ``CLIPTextModel`` without the ``text_model`` level, so LoRA files saved
    from it name ``encoder.layers.0.self_attn.q_proj``; those get the ``text_model.`` back."""
    if module.split(".", 1)[0] in ("encoder", "embeddings", "final_layer_norm"):
        return "text_model." + module
    return module


def kohya_name(component: str, module: str, unet_config: Mapping | Any | None = None, sgm: bool = False) -> str:
    """The Kohya LoRA name (``lora_unet_...``, no ``.part``) of a module; ``sgm=True`` writes the UNet
    in SDXL's sgm layout (needs ``unet_config``) and the text encoders as ``lora_te1_`` / ``lora_te2_``."""
    if component == "unet":
        if sgm:
            if unet_config is None:
                raise LoraError("kohya_name: sgm names need unet_config")
            path = unet_modules(unet_config).get(module)
            if path is None:
                raise LoraError(f"kohya_name: UNet module {module!r} has no sgm name in this UNet")
        else:
            path = module
        return "lora_unet_" + path.replace(".", "_")
    if component == "text_encoder":
        return ("lora_te1_" if sgm else "lora_te_") + module.replace(".", "_")
    if component == "text_encoder_2":
        return "lora_te2_" + module.replace(".", "_")
    raise LoraError(f"kohya_name: no Kohya prefix for component {component!r}")
