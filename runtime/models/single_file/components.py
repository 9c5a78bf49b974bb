"""Build one component (UNet, VAE, text encoder, tokenizer) of a single-file checkpoint.

Each builder maps the file's keys to diffusers' layout (the family modules), settles the config
(infer.py lists the order), builds the model on the meta device and assigns the file's tensors
(memory-mapped, cast only where ``torch_dtype`` asks). A tensor whose shape contradicts the config
is a ShapeMismatchError naming the file's key, the model's key and both shapes.
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, RuntimeErrorBase, ShapeMismatchError
from ..meta_build import skip_init_on_meta
from ..weight_loading import SHOW_KEYS, list_keys, load_weights
from . import clip_keys, infer, open_clip_keys, unet_keys, vae_keys
from .checkpoint import Checkpoint, select_unet_weights
from .infer import FileType

logger = logging.getLogger(__name__)
CLIP_VOCAB_SIZE = 49408


def _origins(original: dict, converted: dict, prefix: str) -> dict[str, str]:
    """converted key -> the file's key holding the same storage (for error messages)."""
    by_ptr = {}
    for k, v in original.items():
        if not v.is_meta:
            by_ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), prefix + k)
    out = {}
    for k, v in converted.items():
        if not v.is_meta:
            hit = by_ptr.get((v.untyped_storage().data_ptr(), v.storage_offset()))
            if hit:
                out[k] = hit
    return out


def build(cls, config: dict, state: dict, *, source: str, dtype=None, origins: dict | None = None,
          config_source: str = "the inferred config", unmapped: list[str] = ()):
    """Meta-build ``cls`` from ``config``, check every shape, assign ``state`` (diffusers keys)."""
    config = {k: v for k, v in config.items() if k != "_class_name" or v == cls.__name__}
    try:
        with torch.device("meta"), skip_init_on_meta():
            model = cls.from_config(config, _source=config_source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {config_source}: {exc}") from None
    expected = model.state_dict()
    bad = [(k, tuple(expected[k].shape), tuple(v.shape)) for k, v in state.items()
           if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if bad:
        origins = origins or {}
        lines = "; ".join(f"{origins.get(k, k)} (as {k}): {config_source} expects {list(e)}, the file has {list(f)}"
                          for k, e, f in bad[:SHOW_KEYS])
        raise ShapeMismatchError(f"{source}: {len(bad)} {cls.__name__} weight(s) contradict {config_source}: {lines}")
    if unmapped:
        logger.warning("%s: %s keys of the file map to no %s weight and were ignored: %s", source, len(unmapped),
                       cls.__name__, list_keys(sorted(unmapped)))
    load_weights(model, state, source=source, dtype=dtype, assign=True,
                 rebuild=lambda: cls.from_config(config, _source=config_source))
    model.eval()
    return model


def inferred(ckpt: Checkpoint, what: str, prefix: str, infer_fn, *args):
    """``infer_fn(*args)``, a config read off the file's shapes; a key set it cannot read (a key the
    rules need is missing, a tensor has too few dimensions) is a ConfigError naming the file and key."""
    try:
        return infer_fn(*args)
    except RuntimeErrorBase:
        raise
    except KeyError as exc:
        key = exc.args[0] if exc.args else "?"
        raise ConfigError(f"{ckpt.source}: cannot infer the {what} config from the file: it has no key {key!r} "
                          f"(under {prefix!r}); pass config=... or a complete checkpoint") from None
    except (IndexError, ValueError, TypeError, AttributeError, ZeroDivisionError, RuntimeError) as exc:
        raise ConfigError(f"{ckpt.source}: cannot infer the {what} config from the file's {prefix!r} keys "
                          f"({type(exc).__name__}: {exc}); pass config=... or a complete checkpoint") from None


def unet_state(ckpt: Checkpoint, ftype: FileType, extract_ema: bool = False) -> dict:
    """The UNet's original-layout keys, prefix stripped."""
    if ftype.unet_prefix:
        return infer.strip(select_unet_weights(ckpt, extract_ema), ftype.unet_prefix)
    return {k: v for k, v in ckpt.tensors.items()}


def load_unet(cls, ckpt: Checkpoint, ftype: FileType, *, config: dict | None = None, config_source: str | None = None,
              dtype=None, prediction_type: str | None = None, extract_ema: bool = False, overrides: dict | None = None):
    sd = unet_state(ckpt, ftype, extract_ema)
    if not sd:
        raise ConfigError(f"{ckpt.source}: the file holds no UNet ({unet_keys.PREFIX}* keys)")
    if config is None:
        config, standard = inferred(ckpt, "UNet", ftype.unet_prefix or "", infer.unet_config, sd, ftype.family,
                                    ftype.name, infer.pooled_width(ckpt.tensors, ftype), prediction_type)
        config_source = f"the shipped {ftype.name} UNet config" if standard else "the UNet config inferred from the file"
    config = {**config, **(overrides or {})}
    lpb = config.get("layers_per_block", 2)
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    state, unmapped = unet_keys.to_diffusers(sd, int(lpb), addition_embed=config.get("addition_embed_type") == "text_time")
    return build(cls, config, state, source=ckpt.source, dtype=dtype, origins=_origins(sd, state, ftype.unet_prefix or ""),
                 config_source=config_source or "config", unmapped=unmapped)


def load_vae(cls, ckpt: Checkpoint, ftype: FileType, *, config: dict | None = None, config_source: str | None = None,
             dtype=None, overrides: dict | None = None):
    prefix = ftype.vae_prefix
    if prefix is None:
        raise ConfigError(f"{ckpt.source}: the file holds no VAE (first_stage_model.* keys); pass vae=...")
    sd = infer.strip(ckpt.tensors, prefix) if prefix else dict(ckpt.tensors)
    if config is None:
        config = inferred(ckpt, "VAE", prefix, infer.vae_config, sd, ftype.family, ftype.name)
        config_source = "the VAE config inferred from the file"
    config = {**config, **(overrides or {})}
    state, unmapped = vae_keys.to_diffusers(sd)
    return build(cls, config, state, source=ckpt.source, dtype=dtype, origins=_origins(sd, state, prefix),
                 config_source=config_source or "config", unmapped=unmapped)


def load_text_encoder(cls, ckpt: Checkpoint, ftype: FileType, component: str, *, config: dict | None = None,
                      config_source: str | None = None, dtype=None):
    layout, prefix = ftype.text[component]
    sd = infer.strip(ckpt.tensors, prefix)
    if config is None:
        config = inferred(ckpt, component, prefix, infer.text_config, sd, layout, ftype.family, ftype.name, component)
        config_source = f"the {component} config inferred from the file"
    projection = cls.__name__ == "CLIPTextModelWithProjection"
    if layout == "clip":
        state, unmapped = clip_keys.to_diffusers(sd)
    else:
        state, unmapped = open_clip_keys.to_diffusers(sd, int(config["num_hidden_layers"]), projection)
    return build(cls, config, state, source=ckpt.source, dtype=dtype, origins=_origins(sd, state, prefix),
                 config_source=config_source or "config", unmapped=unmapped)


def shipped_tokenizer(cls, settings: dict):
    """The CLIP tokenizer of a standard type from the shipped vocabulary and its token settings."""
    vocab, merges = infer.clip_vocabulary()
    return cls(vocab, merges, **{k: v for k, v in settings.items() if k != "_class_name"}, name_or_path="clip-vit")


def check_vocabulary(text_encoder, source: str, component: str) -> None:
    size = getattr(text_encoder.config, "vocab_size", CLIP_VOCAB_SIZE)
    if size != CLIP_VOCAB_SIZE:
        tok = "tokenizer" if component == "text_encoder" else "tokenizer_2"
        raise ConfigError(f"{source}: {component} has a vocabulary of {size} tokens, not CLIP's {CLIP_VOCAB_SIZE}, so "
                          f"the shipped CLIP tokenizer does not fit it; pass {tok}=... (or config= a folder with one)")
