"""Checks a ``UNet2DConditionModel`` config and expands its per-block settings to lists.

diffusers lets most per-block keys be one value or one per down block; this resolves them once,
applies its naming quirk (``num_attention_heads`` defaults to ``attention_head_dim``, which SD
configs use as the head COUNT), and turns every value we do not implement into a ConfigError
naming the key and the value, instead of a silently different network.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config_checks import check_unet_condition
from .errors import ConfigError

_WHERE = "UNet2DConditionModel config"


@dataclass(frozen=True)
class UNetLayout:
    """Per-down-block settings (index i = down block i) after defaults and broadcasting."""

    num_blocks: int
    layers_per_block: list[int]
    transformer_layers: list  # per down block: int, or one int per layer
    up_transformer_layers: list  # per up block (index 0 = deepest)
    num_attention_heads: list[int]
    attention_head_dim: list
    cross_attention_dim: list[int]
    only_cross_attention: list[bool]
    encoder_hid_dim_type: str | None


def _per_block(cfg: dict, key: str, n: int, value=None) -> list:
    value = cfg[key] if value is None else value
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{_WHERE}: {key}={list(value)} has {len(value)} entries; "
                              f"down_block_types has {n} blocks")
        return list(value)
    return [value] * n


def _require(cfg: dict, key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{_WHERE}: {key}={value!r} is not supported; supported: "
                          f"{', '.join(repr(a) for a in allowed)}")


def resolve_layout(cfg: dict) -> UNetLayout:
    """Validate ``cfg`` (the ``__init__`` arguments) and return the per-block layout."""
    check_unet_condition(cfg)
    down, up, channels = list(cfg["down_block_types"]), list(cfg["up_block_types"]), list(cfg["block_out_channels"])
    n = len(down)
    if n == 0 or len(up) != n or len(channels) != n:
        raise ConfigError(f"{_WHERE}: down_block_types ({n}), up_block_types ({len(up)}) and block_out_channels "
                          f"({len(channels)}) must have the same, non-zero length")
    _require(cfg, "time_embedding_type", cfg["time_embedding_type"], ("positional",))
    _require(cfg, "class_embed_type", cfg["class_embed_type"], (None, "timestep", "projection"))
    _require(cfg, "addition_embed_type", cfg["addition_embed_type"], (None, "text_time"))
    _require(cfg, "dual_cross_attention", cfg["dual_cross_attention"], (False,))
    _require(cfg, "attention_type", cfg["attention_type"], ("default",))
    _require(cfg, "mid_block_type", cfg["mid_block_type"], (None, "UNetMidBlock2DCrossAttn"))
    _require(cfg, "resnet_time_scale_shift", cfg["resnet_time_scale_shift"], ("default", "scale_shift"))
    if cfg["norm_num_groups"] is None:
        raise ConfigError(f"{_WHERE}: norm_num_groups=None is not supported (the resnets need group norm)")
    for key, needs in (("class_embed_type", ("projection",)), ("addition_embed_type", ("text_time",))):
        if cfg[key] in needs and cfg["projection_class_embeddings_input_dim"] is None:
            raise ConfigError(f"{_WHERE}: {key}={cfg[key]!r} needs projection_class_embeddings_input_dim")
    if cfg["addition_embed_type"] == "text_time" and cfg["addition_time_embed_dim"] is None:
        raise ConfigError(f"{_WHERE}: addition_embed_type='text_time' needs addition_time_embed_dim")
    if cfg["class_embeddings_concat"] and cfg["class_embed_type"] is None and cfg["num_class_embeds"] is None:
        raise ConfigError(f"{_WHERE}: class_embeddings_concat=True needs a class embedding")

    hid_type = cfg["encoder_hid_dim_type"]
    if hid_type is None and cfg["encoder_hid_dim"] is not None:
        hid_type = "text_proj"  # diffusers' default when only encoder_hid_dim is set
    _require(cfg, "encoder_hid_dim_type", hid_type, (None, "text_proj"))
    if hid_type is not None and cfg["encoder_hid_dim"] is None:
        raise ConfigError(f"{_WHERE}: encoder_hid_dim_type={hid_type!r} needs encoder_hid_dim")

    # diffusers' quirk: attention_head_dim holds the number of heads in SD configs
    heads = cfg["num_attention_heads"] or cfg["attention_head_dim"]
    layers = _per_block(cfg, "transformer_layers_per_block", n)
    reverse = cfg["reverse_transformer_layers_per_block"]
    if reverse is None:
        if any(isinstance(v, (list, tuple)) for v in layers):
            raise ConfigError(f"{_WHERE}: transformer_layers_per_block={cfg['transformer_layers_per_block']} "
                              "has per-layer lists; reverse_transformer_layers_per_block must be given")
        up_layers = layers[::-1]
    else:
        up_layers = _per_block(cfg, "reverse_transformer_layers_per_block", n)
    head_dim = _per_block(cfg, "attention_head_dim", n)
    heads = _per_block(cfg, "num_attention_heads" if cfg["num_attention_heads"] else "attention_head_dim", n, heads)
    cross_dim = _per_block(cfg, "cross_attention_dim", n)
    if hid_type == "text_proj" and len(set(cross_dim)) != 1:
        raise ConfigError(f"{_WHERE}: encoder_hid_dim needs one cross_attention_dim, got {cross_dim}")
    return UNetLayout(
        num_blocks=n,
        layers_per_block=_per_block(cfg, "layers_per_block", n),
        transformer_layers=layers,
        up_transformer_layers=up_layers,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=cross_dim,
        only_cross_attention=_per_block(cfg, "only_cross_attention", n),
        encoder_hid_dim_type=hid_type,
    )
