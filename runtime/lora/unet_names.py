"""The LoRA-targetable modules of a ``UNet2DConditionModel``, from its config, under two spellings.

Every Linear / Conv2d a LoRA file can target gets its diffusers module path (our models use the
same names) and its name in the original LDM / sgm UNet that Kohya's SDXL trainer uses:

- ``conv_in`` = ``input_blocks.0.0``; ``conv_out`` = ``out.2``; ``time_embedding.linear_1/2`` =
  ``time_embed.0/2``; ``add_embedding.linear_1/2`` (SDXL's text-time MLP) and a ``timestep`` /
  ``projection`` class embedding = ``label_emb.0.0/2``.
- The down path numbers its entries ``input_blocks.k`` from 1: one entry per layer of every down
  block (sub-module ``0`` the resnet, ``1`` the attention if the block has one), then one entry
  for the block's downsampler (``input_blocks.k.0.op``) except after the last block.
- ``middle_block.0/1/2`` is resnet, attention, resnet.
- The up path numbers ``output_blocks.k`` from 0: ``layers_per_block + 1`` entries per up block,
  resnet at ``0``, attention at ``1`` if the block has one, and on the block's last entry its
  upsampler ``conv`` at the next index (``1`` without attention, ``2`` with).
- Resnet inner names: ``in_layers.2`` = ``conv1``, ``emb_layers.1`` = ``time_emb_proj``,
  ``out_layers.3`` = ``conv2``, ``skip_connection`` = ``conv_shortcut``; attention inner names
  (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj`` ...) are the same in both.

The per-block settings are read the way diffusers' ``UNet2DConditionModel.__init__`` reads them
(its defaults for missing keys), so ``layers_per_block`` and ``transformer_layers_per_block`` may be
one value or one per block (or per layer), and ``conv_shortcut`` exists only where a resnet's
input and output channels differ.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from runtime.models.errors import LoraError

DEFAULTS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "addition_embed_type": None,
    "class_embed_type": None,
    "num_class_embeds": None,
    "time_cond_proj_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
}
DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
MID_TYPES = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False, None: None}

RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
TRANSFORMER_LEAVES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _get(config: Mapping | Any, key: str):
    if isinstance(config, Mapping):
        return config.get(key, DEFAULTS[key])
    return getattr(config, key, DEFAULTS[key])


def _per_block(value, n: int, key: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise LoraError(f"UNet config: {key}={list(value)} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


def _per_layer(value, n: int, key: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise LoraError(f"UNet config: {key} entry {list(value)} has {len(value)} entries for {n} layers")
        return [int(v) for v in value]
    return [int(value)] * n


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def config_key(config: Mapping | Any) -> tuple:
    """The settings that shape the module tree (diffusers' defaults filled in), hashable."""
    return tuple((k, _freeze(_get(config, k))) for k in DEFAULTS)


def unet_modules(config: Mapping | Any) -> dict[str, str | None]:
    """``{diffusers module path: sgm module path}`` for every LoRA-targetable layer of the UNet, in
    module order; None for a layer the sgm UNet does not have (``time_embedding.cond_proj``,
    ``encoder_hid_proj``)."""
    return dict(_unet_modules(config_key(config)))


@lru_cache(maxsize=16)
def _unet_modules(frozen: tuple) -> tuple[tuple[str, str | None], ...]:
    cfg = dict(frozen)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    channels = [int(c) for c in cfg["block_out_channels"]]
    n = len(down)
    if n == 0 or len(up) != n or len(channels) != n:
        raise LoraError(f"UNet config: down_block_types ({n}), up_block_types ({len(up)}) and "
                        f"block_out_channels ({len(channels)}) differ in length")
    for types, known, key in ((down, DOWN_TYPES, "down_block_types"), (up, UP_TYPES, "up_block_types")):
        for t in types:
            if t not in known:
                raise LoraError(f"UNet config: {key} entry {t!r} has no Kohya/sgm name mapping "
                                f"(supported: {', '.join(known)})")
    if cfg["mid_block_type"] not in MID_TYPES:
        raise LoraError(f"UNet config: mid_block_type {cfg['mid_block_type']!r} has no Kohya/sgm name mapping")
    lpb = [int(v) for v in _per_block(cfg["layers_per_block"], n, "layers_per_block")]
    tlayers = _per_block(cfg["transformer_layers_per_block"], n, "transformer_layers_per_block")
    rev = cfg["reverse_transformer_layers_per_block"]
    up_tlayers = list(rev) if rev is not None else list(reversed(tlayers))
    if len(up_tlayers) != n:
        raise LoraError(f"UNet config: reverse_transformer_layers_per_block has {len(up_tlayers)} entries for {n} blocks")

    out: list[tuple[str, str | None]] = [("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                                  ("time_embedding.linear_2", "time_embed.2")]
    if cfg["time_cond_proj_dim"] is not None:
        out.append(("time_embedding.cond_proj", None))
    hid_type = cfg["encoder_hid_dim_type"]
    if hid_type is None and cfg["encoder_hid_dim"] is not None:
        hid_type = "text_proj"
    if hid_type == "text_proj":
        out.append(("encoder_hid_proj", None))
    if cfg["addition_embed_type"] == "text_time":
        out += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
    elif cfg["class_embed_type"] in ("timestep", "projection"):
        out += [("class_embedding.linear_1", "label_emb.0.0"), ("class_embedding.linear_2", "label_emb.0.2")]

    def resnet(path: str, sgm: str, cin: int, cout: int) -> None:
        for leaf, sgm_leaf in RESNET_SGM.items():
            if leaf != "conv_shortcut" or cin != cout:
                out.append((f"{path}.{leaf}", f"{sgm}.{sgm_leaf}"))

    def transformer(path: str, sgm: str, depth: int) -> None:
        out.append((f"{path}.proj_in", f"{sgm}.proj_in"))
        for t in range(depth):
            for leaf in TRANSFORMER_LEAVES:
                out.append((f"{path}.transformer_blocks.{t}.{leaf}", f"{sgm}.transformer_blocks.{t}.{leaf}"))
        out.append((f"{path}.proj_out", f"{sgm}.proj_out"))

    k, cout = 1, channels[0]
    for b, kind in enumerate(down):
        cin, cout = cout, channels[b]
        depths = _per_layer(tlayers[b], lpb[b], "transformer_layers_per_block")
        for l in range(lpb[b]):
            resnet(f"down_blocks.{b}.resnets.{l}", f"input_blocks.{k}.0", cin if l == 0 else cout, cout)
            if DOWN_TYPES[kind]:
                transformer(f"down_blocks.{b}.attentions.{l}", f"input_blocks.{k}.1", depths[l])
            k += 1
        if b < n - 1:
            out.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1

    mid_attention = MID_TYPES[cfg["mid_block_type"]]
    if mid_attention is not None:
        c = channels[-1]
        resnet("mid_block.resnets.0", "middle_block.0", c, c)
        if mid_attention:  # diffusers builds UNetMidBlock2D with one resnet and no attention
            transformer("mid_block.attentions.0", "middle_block.1",
                        _per_layer(tlayers[-1], 1, "transformer_layers_per_block")[0])
            resnet("mid_block.resnets.1", "middle_block.2", c, c)

    rev_channels, rev_lpb = list(reversed(channels)), list(reversed(lpb))
    k, cout = 0, rev_channels[0]
    for b, kind in enumerate(up):
        prev, cout = cout, rev_channels[b]
        skip_in = rev_channels[min(b + 1, n - 1)]
        layers = rev_lpb[b] + 1
        depths = _per_layer(up_tlayers[b], layers, "reverse_transformer_layers_per_block")
        for l in range(layers):
            res_skip = skip_in if l == layers - 1 else cout
            cin = (prev if l == 0 else cout) + res_skip
            resnet(f"up_blocks.{b}.resnets.{l}", f"output_blocks.{k}.0", cin, cout)
            if UP_TYPES[kind]:
                transformer(f"up_blocks.{b}.attentions.{l}", f"output_blocks.{k}.1", depths[l])
            if l == layers - 1 and b < n - 1:
                out.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{k}.{2 if UP_TYPES[kind] else 1}.conv"))
            k += 1
    out.append(("conv_out", "out.2"))
    return tuple(out)


def sgm_to_diffusers(config: Mapping | Any) -> dict[str, str]:
    """``{sgm module path: diffusers module path}`` (the inverse of ``unet_modules``)."""
    return {sgm: name for name, sgm in unet_modules(config).items() if sgm is not None}
