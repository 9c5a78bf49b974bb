"""Checks of the config values that size tensors, run before a model builds anything.

Without them ``block_out_channels: [-4, 8]`` surfaces as torch's "negative dimension" error from
deep inside a constructor, naming neither the key nor the value. Each check raises a
ConfigError naming the config (``where``), the key and the offending value.
"""
from __future__ import annotations

from .errors import ConfigError


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(where: str, cfg: dict, *keys: str, optional: bool = False, nested: bool = False) -> None:
    """Each key is a positive int or a (non-empty) list of them; ``None`` allowed if ``optional``.

    ``nested``: list entries may themselves be lists of positive ints (per-layer settings such as
    ``transformer_layers_per_block``).
    """
    for key in keys:
        if key not in cfg:
            continue
        value = cfg[key]
        if value is None and optional:
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                raise ConfigError(f"{where}: {key}={list(value)} is empty; it needs at least one positive integer")
            for i, entry in enumerate(value):
                entries = entry if nested and isinstance(entry, (list, tuple)) else [entry]
                for item in entries:
                    if not _is_int(item) or item <= 0:
                        raise ConfigError(f"{where}: {key}={_show(value)} has entry {i} = {item!r}; every entry "
                                          "must be a positive integer")
        elif not _is_int(value) or value <= 0:
            raise ConfigError(f"{where}: {key}={value!r} must be a positive integer"
                              f"{' (or a list of them)' if key.endswith(('_per_block', '_dim', '_channels')) else ''}")


def divides(where: str, groups_key: str, groups, channels_key: str, channels) -> None:
    """GroupNorm: ``groups`` must divide every entry of ``channels``."""
    if groups is None:
        return
    for c in channels if isinstance(channels, (list, tuple)) else [channels]:
        if c % groups:
            raise ConfigError(f"{where}: {groups_key}={groups} does not divide {channels_key} entry {c} "
                              f"({channels_key}={_show(channels)}); GroupNorm needs channels divisible by groups")


def _show(value):
    return list(value) if isinstance(value, tuple) else value


def check_unet_condition(cfg: dict) -> None:
    where = "UNet2DConditionModel config"
    positive(where, cfg, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
             "cross_attention_dim", "attention_head_dim", "norm_num_groups", "conv_in_kernel", "conv_out_kernel")
    positive(where, cfg, "transformer_layers_per_block", "reverse_transformer_layers_per_block",
             optional=True, nested=True)
    positive(where, cfg, "num_attention_heads", "time_embedding_dim", "encoder_hid_dim", "addition_time_embed_dim",
             "num_class_embeds", "projection_class_embeddings_input_dim", "time_cond_proj_dim", "sample_size",
             optional=True)
    divides(where, "norm_num_groups", cfg.get("norm_num_groups"), "block_out_channels", cfg["block_out_channels"])


def check_unet2d(cfg: dict) -> None:
    where = "UNet2DModel config"
    positive(where, cfg, "in_channels", "out_channels", "block_out_channels", "layers_per_block", "norm_num_groups")
    positive(where, cfg, "attention_head_dim", "attn_norm_num_groups", "time_embedding_dim", "num_class_embeds",
             "num_train_timesteps", "sample_size", optional=True)
    divides(where, "norm_num_groups", cfg["norm_num_groups"], "block_out_channels", cfg["block_out_channels"])
    divides(where, "attn_norm_num_groups", cfg.get("attn_norm_num_groups"), "block_out_channels",
            cfg["block_out_channels"])


def check_autoencoder_kl(cfg: dict) -> None:
    where = "AutoencoderKL config"
    positive(where, cfg, "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups")
    positive(where, cfg, "sample_size", optional=True)
    divides(where, "norm_num_groups", cfg["norm_num_groups"], "block_out_channels", cfg["block_out_channels"])
