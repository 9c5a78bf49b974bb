"""UNet keys: the original (LDM / A1111 / ComfyUI) layout <-> diffusers' layout, and the config
the tensor shapes imply.

Original layout (``model.diffusion_model.`` stripped): ``input_blocks.0.0`` is ``conv_in``; then
each down block ``b`` holds ``layers_per_block`` (resnet, optional attention) pairs
``input_blocks.i.{0,1}`` and, except the last block, one downsampler ``input_blocks.i.0.op``, so
``i = 1 + b * (lpb + 1) + l``. ``middle_block.{0,1,2}`` is resnet, attention, resnet. Each up block
holds ``lpb + 1`` entries ``output_blocks.i.{0,1,2}`` (resnet, optional attention, and on the last
entry of every block but the deepest-last an upsampler ``.conv`` at index 1 or 2), ``i = b * (lpb +
1) + l``. Resnet inner names differ (``in_layers.0`` = ``norm1`` ...); attention inner names are the
same in both layouts. Renaming is pure dict work: no tensor is copied.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError

PREFIX = "model.diffusion_model."

TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# label_emb is SDXL's add_embedding (addition_embed_type="text_time") or a class embedding
LABEL = {"label_emb.0.0": "linear_1", "label_emb.0.2": "linear_2"}
RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
RESNET_BACK = {v: k for k, v in RESNET.items()}
MID = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
MID_BACK = {v: k for k, v in MID.items()}

_IN = re.compile(r"input_blocks\.(\d+)\.(\d+)\.(.+)")
_OUT = re.compile(r"output_blocks\.(\d+)\.(\d+)\.(.+)")
_MID = re.compile(r"middle_block\.(\d+)\.(.+)")
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")
_DMID = re.compile(r"mid_block\.(resnets\.\d+|attentions\.0)\.(.+)")


def _split_leaf(rest: str, table: dict) -> str | None:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def layers_per_block(sd: dict) -> int:
    """From the positions of the downsamplers (``input_blocks.i.0.op``); one block: all inputs."""
    ops = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if ops:
        return ops[0] - 1
    count = len({int(m.group(1)) for k in sd if (m := _IN.match(k))})
    return count - 1


def _label_target(addition: bool) -> str:
    return "add_embedding" if addition else "class_embedding"


def to_diffusers(sd: dict[str, torch.Tensor], lpb: int, addition_embed: bool = True) -> tuple[dict, list[str]]:
    """Original-layout UNet (prefix stripped) -> (diffusers state dict, keys that map to nothing)."""
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, t in sd.items():
        new = _unet_key(key, lpb, addition_embed, sd)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = t
    return out, unmapped


def _unet_key(key: str, lpb: int, addition: bool, sd: dict) -> str | None:
    for table, prefix in ((TOP, ""), (LABEL, _label_target(addition) + ".")):
        hit = _split_leaf(key, table)
        if hit is not None:
            return prefix + hit
    if key == "label_emb.weight":
        return "class_embedding.weight"
    if m := _IN.match(key):
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        b, l = divmod(i - 1, lpb + 1)
        if rest.startswith("op."):
            return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
        if j == 0:
            leaf = _split_leaf(rest, RESNET)
            return f"down_blocks.{b}.resnets.{l}.{leaf}" if leaf else None
        if j == 1:
            return f"down_blocks.{b}.attentions.{l}.{rest}"
        return None
    if m := _MID.match(key):
        j, rest = m.group(1), m.group(2)
        if j not in MID:
            return None
        if MID[j].startswith("resnets"):
            leaf = _split_leaf(rest, RESNET)
            return f"mid_block.{MID[j]}.{leaf}" if leaf else None
        return f"mid_block.{MID[j]}.{rest}"
    if m := _OUT.match(key):
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        b, l = divmod(i, lpb + 1)
        if j > 0 and rest.startswith("conv."):  # the upsampler (index 1 without attention, 2 with)
            return f"up_blocks.{b}.upsamplers.0.conv.{rest[5:]}"
        if j == 0:
            leaf = _split_leaf(rest, RESNET)
            return f"up_blocks.{b}.resnets.{l}.{leaf}" if leaf else None
        if j == 1:
            return f"up_blocks.{b}.attentions.{l}.{rest}"
    return None


def to_original(sd: dict[str, torch.Tensor], lpb: int) -> dict[str, torch.Tensor]:
    """diffusers-layout UNet state dict -> original layout (no prefix); the inverse of to_diffusers."""
    up_attention = {int(m.group(1)) for k in sd if (m := _UP.match(k)) and m.group(2) == "attentions"}
    top_back = {v: k for k, v in TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new = None
        hit = _split_leaf(key, top_back)
        if hit is not None:
            new = hit
        elif key.startswith(("add_embedding.", "class_embedding.linear")):
            leaf = _split_leaf(key.split(".", 1)[1], {v: k for k, v in LABEL.items()})
            new = leaf
        elif key == "class_embedding.weight":
            new = "label_emb.weight"
        elif m := _DOWN.match(key):
            b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "resnets":
                new = f"input_blocks.{1 + b * (lpb + 1) + l}.0.{_split_leaf(rest, RESNET_BACK)}"
            else:
                new = f"input_blocks.{1 + b * (lpb + 1) + l}.1.{rest}"
        elif m := _DMID.match(key):
            part, rest = m.group(1), m.group(2)
            leaf = _split_leaf(rest, RESNET_BACK) if part.startswith("resnets") else rest
            new = f"middle_block.{MID_BACK[part]}.{leaf}"
        elif m := _UP.match(key):
            b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "upsamplers":
                new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_attention else 1}.{rest}"
            elif kind == "resnets":
                new = f"output_blocks.{b * (lpb + 1) + l}.0.{_split_leaf(rest, RESNET_BACK)}"
            else:
                new = f"output_blocks.{b * (lpb + 1) + l}.1.{rest}"
        if new is None or "None" in new.split("."):
            raise ConfigError(f"save_single_file: no original-layout name for the UNet key {key!r}")
        out[new] = t
    return out


# ---- the config the shapes imply ----------------------------------------------------------
def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """What the original-layout keys and shapes tell: channels, blocks, layers, attention layout.

    Not in the keys (filled in by infer.py from the family): attention heads, sample_size,
    ``addition_time_embed_dim``, ``upcast_attention``, ``norm_num_groups`` (32).
    """
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ConfigError("not an original-layout UNet: no input_blocks.0.0.weight / out.2.weight")
    lpb = layers_per_block(sd)
    n_inputs = len({int(m.group(1)) for k in sd if (m := _IN.match(k))})
    num_blocks = n_inputs // (lpb + 1)  # conv_in + lpb layers per block + a downsampler on all but the last
    down, channels, transformer_layers = [], [], []
    linear = None
    cross = None
    for b in range(num_blocks):
        i = 1 + b * (lpb + 1)
        channels.append(int(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]))
        attn = f"input_blocks.{i}.1."
        if any(k.startswith(attn) for k in sd):
            down.append("CrossAttnDownBlock2D")
            depth = len({int(m.group(1)) for k in sd if k.startswith(attn)
                         and (m := re.match(re.escape(attn) + r"transformer_blocks\.(\d+)\.", k))})
            transformer_layers.append(depth)
            linear = sd[attn + "proj_in.weight"].ndim == 2
            cross = int(sd[attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1])
        else:
            down.append("DownBlock2D")
            transformer_layers.append(1)
    up = []
    for b in range(num_blocks):
        attn, upsampler = f"output_blocks.{b * (lpb + 1)}.1.", f"output_blocks.{b * (lpb + 1)}.1.conv."
        has_attn = any(k.startswith(attn) and not k.startswith(upsampler) for k in sd)
        up.append("CrossAttnUpBlock2D" if has_attn else "UpBlock2D")
    if cross is None and any(k.startswith("middle_block.1.") for k in sd):
        linear = sd["middle_block.1.proj_in.weight"].ndim == 2
        cross = int(sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    mid_attn = any(k.startswith("middle_block.1.") for k in sd)
    config = {
        "in_channels": int(sd["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(sd["out.2.weight"].shape[0]),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": cross if cross is not None else 1280,
        "use_linear_projection": bool(linear),
        "transformer_layers_per_block": transformer_layers[0] if len(set(transformer_layers)) == 1 else transformer_layers,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_attn else None,
    }
    if "label_emb.0.0.weight" in sd:
        config["projection_class_embeddings_input_dim"] = int(sd["label_emb.0.0.weight"].shape[1])
    return config
