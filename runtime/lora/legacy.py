"""Dotted LoRA key names inside a component: PEFT's and the older diffusers spellings.

After the component prefix (``unet.``, ``text_encoder.``, ``text_encoder_2.``) a key is a module
path and a part:

- PEFT / current diffusers: ``<module>.lora_A.weight`` (down) / ``<module>.lora_B.weight`` (up).
- Older diffusers, attention processors: ``<attention>.processor.to_q_lora.down.weight`` (``to_k``,
  ``to_v``; ``to_out_lora`` is the output projection: ``to_out.0`` in the UNet, ``out_proj`` in
  CLIP, whose ``to_q`` ... are ``q_proj`` ...). ``processor`` may be absent.
- Older diffusers, LoRA-compatible layers: ``<module>.lora.down.weight`` / ``.lora.up.weight``,
  and the text encoders' ``<module>.lora_linear_layer.down.weight`` / ``.up.weight``.
- ``<module>.alpha``: a per-module alpha written next to any of these.

``split_dotted`` returns ``(module, part)`` with ``part`` in ``down`` / ``up`` / ``alpha``.
"""
from __future__ import annotations

import re

from runtime.models.errors import LoraError

_PEFT = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
_PROCESSOR = re.compile(r"(?P<module>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight")
_LAYER = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<part>down|up)\.weight")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")
# what may stand before ".alpha": a module, or a weight key / LoRA name of the forms above
_ALPHA_BASE = re.compile(r"(?P<module>.+?)(?:\.(?P<proj>to_q|to_k|to_v|to_out)_lora|\.lora|\.lora_linear_layer)?"
                         r"(?:\.(?:down|up)\.weight|\.lora_[AB]\.weight)?")

UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# markers of parts we refuse, each with the reason (checked on the whole key)
REFUSED = (
    ("lora_magnitude_vector", "a DoRA magnitude (lora_magnitude_vector); DoRA is not supported"),
    ("dora_scale", "a DoRA magnitude (dora_scale); DoRA is not supported"),
    ("lora_embedding_A", "an embedding LoRA (lora_embedding_A); only Linear/Conv2d LoRA is supported"),
    ("lora_embedding_B", "an embedding LoRA (lora_embedding_B); only Linear/Conv2d LoRA is supported"),
    (".lora_B.bias", "a LoRA bias (lora_B.bias, PEFT's lora_bias=True); not supported"),
    (".lora_A.bias", "a LoRA bias (lora_A.bias); not supported"),
    (".lokr_", "a LoKr factor; LoKr is not supported"),
    (".hada_", "a LoHa factor; LoHa is not supported"),
)


def refused(key: str) -> None:
    """Raise LoraError if ``key`` is a part of a network type we do not support."""
    for marker, why in REFUSED:
        if marker in key:
            raise LoraError(f"LoRA key {key!r} is {why}")


def _strip_processor(module: str) -> str:
    return ".".join(p for p in module.split(".") if p != "processor")


def split_dotted(rest: str, component: str) -> tuple[str, str, str] | None:
    """``(module, part, style)`` of a dotted key inside ``component``; None if it is not a LoRA key.

    ``style`` is ``"peft"`` or ``"legacy"`` (older diffusers) or ``"alpha"``."""
    if m := _PEFT.fullmatch(rest):
        return m["module"], "down" if m["part"] == "A" else "up", "peft"
    if m := _PROCESSOR.fullmatch(rest):
        table = UNET_PROJ if component == "unet" else CLIP_PROJ
        return f"{_strip_processor(m['module'])}.{table[m['proj']]}", m["part"], "legacy"
    if m := _LAYER.fullmatch(rest):
        return _strip_processor(m["module"]), m["part"], "legacy"
    if m := _ALPHA.fullmatch(rest):
        base = _ALPHA_BASE.fullmatch(m["module"])
        module = _strip_processor(base["module"])
        if base["proj"]:
            module += "." + (UNET_PROJ if component == "unet" else CLIP_PROJ)[base["proj"]]
        return module, "alpha", "alpha"
    return None
