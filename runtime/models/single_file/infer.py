"""What a single-file checkpoint is, from its keys and shapes alone (offline), and the configs of
its components.

Types (diffusers' names): ``v1`` (SD 1.x: OpenAI CLIP, cross-attention 768), ``v2`` (SD 2.x:
OpenCLIP ViT-H, 1024), ``inpainting`` / ``inpainting_v2`` (9 UNet input channels), ``depth`` (SD
2.x depth, 5 input channels), ``xl_base`` (``conditioner.embedders.0.transformer`` +
``conditioner.embedders.1.model``), ``xl_inpaint``, ``xl_refiner`` (``conditioner.embedders.0.model``
only), ``vae`` (a bare VAE file), ``unet`` (a bare UNet file).

Configs, first match wins: ``config=`` (a diffusers folder or hub id) > ``original_config=`` (the
LDM yaml) > the config we wrote into a file we saved (safetensors metadata) > the shipped config
of a standard type (configs/<type>.json; used when the file's shapes are exactly the standard
ones) > the config derived from the shapes (unet_keys / vae_keys / clip_keys / open_clip_keys
``infer_config``) plus the family rules for what shapes cannot tell:

- attention heads: SD 1.x family 8 per block; SD 2.x / SDXL families ``channels // 64`` per block
  (head width 64, what the standard files use); CLIP ``hidden // 64``;
- ``sample_size``: 64 (SD 1.x), 96 (SD 2.x v-prediction) or 64 (epsilon), 128 (SDXL);
- VAE ``scaling_factor``: 0.13025 for the SDXL families, 0.18215 otherwise;
- SDXL ``addition_time_embed_dim``: ``(label_emb input - pooled width) / 6`` (5 for the refiner).

``prediction_type``: SD 2.x files do not say whether they predict epsilon or v; the default is
``v_prediction`` (SD 2.0/2.1 768, as diffusers assumes); pass ``prediction_type="epsilon"`` for
the 512 "base" models (their UNet ``sample_size`` is then 64). Every other type defaults to
``epsilon``.
"""
from __future__ import annotations

import copy
import gzip
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from . import clip_keys, open_clip_keys, unet_keys, vae_keys

CONFIG_DIR = Path(__file__).parent / "configs"
METADATA_KEY = "diffusion_runtime.config"  # JSON {component: config} in files we write

UNET = unet_keys.PREFIX
VAE = vae_keys.PREFIXES[0]
SD1_TEXT, SDXL_TEXT = clip_keys.SD1_PREFIX, clip_keys.SDXL_PREFIX
SD2_TEXT, SDXL_TEXT_2, REFINER_TEXT = open_clip_keys.SD2_PREFIX, open_clip_keys.SDXL_PREFIX, open_clip_keys.REFINER_PREFIX

# One key (or more) per part that every file of a type holds: what an unknown file is measured against.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "v1": (UNET + "input_blocks.0.0.weight", UNET + "out.2.weight", VAE + "decoder.conv_in.weight",
           SD1_TEXT + "text_model.embeddings.token_embedding.weight"),
    "v2": (UNET + "input_blocks.0.0.weight", UNET + "out.2.weight", VAE + "decoder.conv_in.weight",
           SD2_TEXT + "token_embedding.weight"),
    "xl_base": (UNET + "input_blocks.0.0.weight", UNET + "out.2.weight", UNET + "label_emb.0.0.weight",
                VAE + "decoder.conv_in.weight", SDXL_TEXT + "text_model.embeddings.token_embedding.weight",
                SDXL_TEXT_2 + "token_embedding.weight"),
    "xl_refiner": (UNET + "input_blocks.0.0.weight", UNET + "out.2.weight", UNET + "label_emb.0.0.weight",
                   VAE + "decoder.conv_in.weight", REFINER_TEXT + "token_embedding.weight"),
    "vae": ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"),
    "unet": ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"),
}
FAMILY_OF = {"v1": "sd1", "inpainting": "sd1", "v2": "sd2", "inpainting_v2": "sd2", "depth": "sd2",
             "xl_base": "sdxl", "xl_inpaint": "sdxl", "xl_refiner": "refiner"}
# UNet config keys the shapes settle: a file is of a standard type when these equal the shipped config's
SHAPE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block",
              "projection_class_embeddings_input_dim")
EMA_PREFIX = "model_ema."


@dataclass
class FileType:
    name: str  # a key of FAMILY_OF, or "vae" / "unet"
    family: str | None  # sd1, sd2, sdxl, refiner (None for a bare VAE)
    unet_prefix: str | None = None  # "model.diffusion_model." or "" (bare UNet)
    vae_prefix: str | None = None
    text: dict = field(default_factory=dict)  # component name -> (layout "clip"/"open_clip", prefix)
    ema: bool = False
    standard: bool = False


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def ema_weights_present(keys) -> bool:
    return sum(k.startswith(EMA_PREFIX) for k in keys) > 0 and _has_prefix(keys, UNET)


def describe_unknown(keys) -> str:
    """Which known type the keys come closest to, and which of its keys are missing."""
    keys = set(keys)
    scores = {name: sum(k in keys for k in sig) / len(sig) for name, sig in SIGNATURES.items()}
    best = max(scores, key=scores.get)
    missing = [k for k in SIGNATURES[best] if k not in keys]
    sample = ", ".join(sorted(keys)[:5])
    return (f"the keys match no known single-file layout (SD 1.x, SD 2.x, SDXL base/refiner, inpainting, depth, "
            f"a bare VAE or UNet); closest: {best!r} ({scores[best]:.0%} of its marker keys), which would also "
            f"need: {', '.join(missing)}. First keys in the file: {sample}")


def detect(sd: dict[str, torch.Tensor]) -> FileType:
    """The file's type from its keys (and, where keys do not tell, the cross-attention width)."""
    try:
        return _detect(sd)
    except (IndexError, KeyError, AttributeError):  # marker keys with impossible shapes
        raise CheckpointError(describe_unknown(sd.keys())) from None


def _detect(sd: dict[str, torch.Tensor]) -> FileType:
    keys = sd.keys()
    if not _has_prefix(keys, UNET):
        if all(k in sd for k in SIGNATURES["vae"]):
            return FileType("vae", None, vae_prefix="")
        for prefix in vae_keys.PREFIXES:
            if all(prefix + k in sd for k in SIGNATURES["vae"]):
                return FileType("vae", None, vae_prefix=prefix)
        if all(k in sd for k in SIGNATURES["unet"]):
            family = _family_from_unet(sd, "")
            return FileType(_name(family, int(sd["input_blocks.0.0.weight"].shape[1])), family, unet_prefix="")
        raise CheckpointError(describe_unknown(keys))
    text: dict = {}
    if _has_prefix(keys, SDXL_TEXT_2):
        family = "sdxl"
        if _has_prefix(keys, SDXL_TEXT):
            text["text_encoder"] = ("clip", SDXL_TEXT)
        text["text_encoder_2"] = ("open_clip", SDXL_TEXT_2)
    elif _has_prefix(keys, REFINER_TEXT):
        family = "refiner"
        text["text_encoder_2"] = ("open_clip", REFINER_TEXT)
    elif _has_prefix(keys, SD2_TEXT):
        family = "sd2"
        text["text_encoder"] = ("open_clip", SD2_TEXT)
    elif _has_prefix(keys, SD1_TEXT):
        family = "sd1"
        text["text_encoder"] = ("clip", SD1_TEXT)
    else:
        family = _family_from_unet(sd, UNET)
    if UNET + "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(describe_unknown(keys))
    in_channels = int(sd[UNET + "input_blocks.0.0.weight"].shape[1])
    vae_prefix = VAE if _has_prefix(keys, VAE + "decoder.") else None
    return FileType(_name(family, in_channels), family, unet_prefix=UNET, vae_prefix=vae_prefix, text=text,
                    ema=ema_weights_present(keys))


def _name(family: str, in_channels: int) -> str:
    if family == "sd1":
        return "inpainting" if in_channels == 9 else "v1"
    if family == "sd2":
        return {9: "inpainting_v2", 5: "depth"}.get(in_channels, "v2")
    if family == "sdxl":
        return "xl_inpaint" if in_channels == 9 else "xl_base"
    return "xl_refiner"


def _family_from_unet(sd: dict, prefix: str) -> str:
    """Without text-encoder keys: SD 1.x vs 2.x vs SDXL by the cross-attention width."""
    widths = [int(v.shape[1]) for k, v in sd.items() if k.startswith(prefix) and k.endswith("attn2.to_k.weight")]
    width = widths[0] if widths else None
    by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "refiner"}
    if width in by_width:
        return by_width[width]
    if prefix + "label_emb.0.0.weight" in sd:
        return "sdxl"
    linear = [v.ndim == 2 for k, v in sd.items() if k.startswith(prefix) and k.endswith("proj_in.weight")]
    return "sd2" if linear and linear[0] else "sd1"


# ---- shipped configs ----------------------------------------------------------------------
@lru_cache(maxsize=None)
def _standard(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def standard_config(name: str) -> dict:
    """The shipped configs of a standard type (a fresh copy): unet, vae, text_encoder(_2), tokenizer(_2), scheduler."""
    return copy.deepcopy(_standard(name))


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's BPE vocabulary (49408 tokens), rebuilt from the shipped merges.

    The vocabulary is the 256 byte characters, the same with ``</w>``, one token per merge, then
    the two specials: the merges settle it, so only they are shipped (configs/clip_merges.txt.gz,
    from open_clip's bpe_simple_vocab_16e6.txt.gz); SD 1.x, SD 2.x and SDXL all use this one.
    """
    lines = gzip.decompress((CONFIG_DIR / "clip_merges.txt.gz").read_bytes()).decode("utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines[1:] if line]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


# ---- configs from the shapes ---------------------------------------------------------------
def strip(sd: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def unet_config(unet_sd: dict, family: str, name: str, pooled_width: int | None = None,
                prediction_type: str | None = None) -> tuple[dict, bool]:
    """(UNet config, whether it is the shipped standard one) for original-layout UNet keys."""
    derived = unet_keys.infer_config(unet_sd)
    standard = _standard(name).get("unet")
    if standard and _matches_standard(derived, standard):
        config = copy.deepcopy(standard)
        if family == "sd2" and prediction_type == "epsilon" and name == "v2":
            config.update(sample_size=64, upcast_attention=False)  # SD 2.x "base" (512)
        return config, True
    config = dict(derived)
    channels = config["block_out_channels"]
    config["attention_head_dim"] = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    v_pred = family == "sd2" and prediction_type in (None, "v_prediction")
    config["sample_size"] = {"sd1": 64, "sd2": 96 if v_pred else 64}.get(family, 128)
    if "projection_class_embeddings_input_dim" in config:
        if family in ("sdxl", "refiner"):
            ids = 5 if family == "refiner" else 6
            width = config["projection_class_embeddings_input_dim"]
            time_dim = (width - pooled_width) // ids if pooled_width and (width - pooled_width) % ids == 0 else 256
            config.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim)
        else:
            config["class_embed_type"] = "projection"
    return config, False


UNET_DEFAULTS = {"use_linear_projection": False, "transformer_layers_per_block": 1,
                 "projection_class_embeddings_input_dim": None}


def _matches_standard(derived: dict, standard: dict) -> bool:
    """The shape-settled keys agree; transformer depth only where a block attends."""
    for key in SHAPE_KEYS:
        a, b = derived.get(key, UNET_DEFAULTS.get(key)), standard.get(key, UNET_DEFAULTS.get(key))
        if key == "transformer_layers_per_block":
            n = len(derived["down_block_types"])
            a = list(a) if isinstance(a, (list, tuple)) else [a] * n
            b = list(b) if isinstance(b, (list, tuple)) else [b] * n
            attends = [t.startswith("CrossAttn") for t in derived["down_block_types"]]
            if len(a) != len(b) or any(x != y for x, y, on in zip(a, b, attends) if on):
                return False
        elif not _same(a, b):
            return False
    return True


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        seq, one = (a, b) if isinstance(a, (list, tuple)) else (b, a)
        return all(x == one for x in seq)
    return a == b or (a is None and b is None)


def vae_config(vae_sd: dict, family: str | None, name: str) -> dict:
    derived = vae_keys.infer_config(vae_sd)
    standard = _standard(name).get("vae") if name in FAMILY_OF else None
    if standard and all(_same(derived[k], standard.get(k, derived[k])) for k in
                        ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels")):
        return copy.deepcopy(standard)
    xl = family in ("sdxl", "refiner")
    derived.update(scaling_factor=0.13025 if xl else 0.18215,
                   sample_size={"sd2": 768}.get(family, 1024 if xl else 512), force_upcast=True)
    return derived


def text_config(text_sd: dict, layout: str, family: str, name: str, component: str) -> dict:
    """Config of one text encoder from its (prefix-stripped, original-layout) keys."""
    projection = component == "text_encoder_2"
    if layout == "clip":
        derived = clip_keys.infer_config(clip_keys.to_diffusers(text_sd)[0])
    else:
        blocks = open_clip_keys.num_resblocks(text_sd)
        layers = blocks - 1 if family == "sd2" else blocks  # SD 2.x: the penultimate layer
        derived = open_clip_keys.infer_config(text_sd, layers, projection)
    standard = _standard(name).get(component)
    if standard and all(derived[k] == standard[k] for k in
                        ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")):
        return copy.deepcopy(standard)
    derived["_class_name"] = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    return derived


def pooled_width(sd: dict, filetype: FileType) -> int | None:
    """The pooled text embedding's width (the OpenCLIP projection's output) in an SDXL file."""
    entry = filetype.text.get("text_encoder_2")
    if entry is None:
        return None
    proj = sd.get(entry[1] + "text_projection")
    return int(proj.shape[1]) if proj is not None else None


def metadata_configs(metadata: dict | None) -> dict:
    """The component configs we wrote into a file's safetensors metadata (empty for other files)."""
    if not metadata or METADATA_KEY not in metadata:
        return {}
    try:
        value = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the file's {METADATA_KEY!r} metadata is not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}
