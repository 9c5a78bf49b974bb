"""VAE keys: the original (LDM) layout <-> diffusers' AutoencoderKL layout, and the implied config.

Original layout (``first_stage_model.`` stripped in full checkpoints; bare VAE files have no
prefix): ``encoder.down.i.block.j`` / ``encoder.down.i.downsample.conv``; the decoder's
``decoder.up.i`` are stored in reverse order (``up.0`` is the block nearest the output, diffusers'
``up_blocks[n-1]``); ``{encoder,decoder}.mid.block_{1,2}`` and ``mid.attn_1.{norm,q,k,v,proj_out}``
whose weights are 1x1 convolutions ``(C, C, 1, 1)`` where diffusers has linear ``(C, C)`` weights
(a view either way, no copy); ``nin_shortcut`` is ``conv_shortcut``; ``norm_out`` is
``conv_norm_out``.
"""
from __future__ import annotations

import re

import torch

from ..errors import ConfigError

PREFIXES = ("first_stage_model.", "vae.")
ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTN_BACK = {v: k for k, v in ATTN.items()}
_DOWN = re.compile(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)")
_UP = re.compile(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)")
_MID = re.compile(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)")
_DDOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)")
_DUP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)")
_DMID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets\.0|resnets\.1|attentions\.0)\.(.+)")
# LDM training leftovers in full checkpoints (the discriminator / LPIPS loss): not part of the VAE
IGNORED = ("loss.",)


def _resnet_leaf(rest: str) -> str:
    return rest.replace("nin_shortcut", "conv_shortcut")


def num_up_blocks(sd: dict) -> int:
    return len({int(m.group(1)) for k in sd if (m := _UP.match(k))})


def to_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Original-layout VAE (prefix stripped) -> (diffusers state dict, keys that map to nothing)."""
    n = num_up_blocks(sd)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, t in sd.items():
        if key.startswith(IGNORED):
            continue
        new = None
        if key.startswith(("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                           "quant_conv.", "post_quant_conv.")):
            new = key
        elif key.startswith(("encoder.norm_out.", "decoder.norm_out.")):
            new = key.replace(".norm_out.", ".conv_norm_out.")
        elif m := _DOWN.match(key):
            i, j, rest = m.group(1), m.group(3), m.group(4)
            new = (f"encoder.down_blocks.{i}.resnets.{j}.{_resnet_leaf(rest)}" if j is not None
                   else f"encoder.down_blocks.{i}.downsamplers.0.{rest}")
        elif m := _UP.match(key):
            i, j, rest = n - 1 - int(m.group(1)), m.group(3), m.group(4)
            new = (f"decoder.up_blocks.{i}.resnets.{j}.{_resnet_leaf(rest)}" if j is not None
                   else f"decoder.up_blocks.{i}.upsamplers.0.{rest}")
        elif m := _MID.match(key):
            side, part, rest = m.groups()
            if part == "attn_1":
                name, _, leaf = rest.rpartition(".")
                if name in ATTN:
                    new = f"{side}.mid_block.attentions.0.{ATTN[name]}.{leaf}"
                    if leaf == "weight" and t.ndim == 4:
                        t = t[:, :, 0, 0]  # 1x1 conv -> linear (a view)
            else:
                new = f"{side}.mid_block.resnets.{int(part[-1]) - 1}.{_resnet_leaf(rest)}"
        if new is None:
            unmapped.append(key)
        else:
            out[new] = t
    return out, unmapped


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-layout AutoencoderKL state dict -> original layout (no prefix)."""
    n = len({int(m.group(1)) for k in sd if (m := _DUP.match(k))})
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new = None
        if key.startswith(("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                           "quant_conv.", "post_quant_conv.")):
            new = key
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            new = key.replace(".conv_norm_out.", ".norm_out.")
        elif m := _DDOWN.match(key):
            i, j, rest = m.group(1), m.group(3), m.group(4)
            new = (f"encoder.down.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}" if j is not None
                   else f"encoder.down.{i}.downsample.{rest}")
        elif m := _DUP.match(key):
            i, j, rest = n - 1 - int(m.group(1)), m.group(3), m.group(4)
            new = (f"decoder.up.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}" if j is not None
                   else f"decoder.up.{i}.upsample.{rest}")
        elif m := _DMID.match(key):
            side, part, rest = m.groups()
            if part == "attentions.0":
                name, _, leaf = rest.rpartition(".")
                if name in ATTN_BACK:
                    new = f"{side}.mid.attn_1.{ATTN_BACK[name]}.{leaf}"
                    if leaf == "weight" and name != "group_norm" and t.ndim == 2:
                        t = t[:, :, None, None]  # linear -> 1x1 conv, as the original stores it
            else:
                new = f"{side}.mid.block_{int(part[-1]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        if new is None:
            raise ConfigError(f"save_single_file: no original-layout name for the VAE key {key!r}")
        out[new] = t
    return out


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """Channels, blocks, layers and latent size from an original-layout VAE's shapes.

    Not in the keys: ``scaling_factor`` (0.18215 for SD 1.x / 2.x, 0.13025 for SDXL: infer.py sets
    it from the family), ``sample_size``, ``norm_num_groups`` (32).
    """
    for key in ("encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.conv_in.weight"):
        if key not in sd:
            raise ConfigError(f"not an original-layout VAE: no {key}")
    n = len({int(m.group(1)) for k in sd if (m := _DOWN.match(k))})
    channels = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    layers = len({int(m.group(3)) for k in sd if (m := _DOWN.match(k)) and m.group(1) == "0" and m.group(3)})
    latent = int(sd["decoder.conv_in.weight"].shape[1])
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in sd),
    }
