"""The test side's own diffusers -> original (LDM) layout writer, independent of runtime's mapping.

It walks the diffusers config (blocks, layers) and enumerates module-prefix pairs explicitly, where
the runtime parses key names; a mapping bug on either side shows up as a parity failure.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _module_map_unet(config: dict) -> list[tuple[str, str, str]]:
    """(diffusers module prefix, original module prefix, kind) for every module of the UNet."""
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    rows = [("time_embedding.linear_1", "time_embed.0", "plain"), ("time_embedding.linear_2", "time_embed.2", "plain"),
            ("conv_in", "input_blocks.0.0", "plain"), ("conv_norm_out", "out.0", "plain"), ("conv_out", "out.2", "plain"),
            ("add_embedding.linear_1", "label_emb.0.0", "plain"), ("add_embedding.linear_2", "label_emb.0.2", "plain"),
            ("mid_block.resnets.0", "middle_block.0", "resnet"), ("mid_block.attentions.0", "middle_block.1", "plain"),
            ("mid_block.resnets.1", "middle_block.2", "resnet")]
    index = 1
    for b in range(n):
        for l in range(lpb):
            rows.append((f"down_blocks.{b}.resnets.{l}", f"input_blocks.{index}.0", "resnet"))
            rows.append((f"down_blocks.{b}.attentions.{l}", f"input_blocks.{index}.1", "plain"))
            index += 1
        if b != n - 1:
            rows.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", "plain"))
            index += 1
    index = 0
    for b in range(n):
        attends = config["up_block_types"][b].startswith("CrossAttn")
        for l in range(lpb + 1):
            rows.append((f"up_blocks.{b}.resnets.{l}", f"output_blocks.{index}.0", "resnet"))
            rows.append((f"up_blocks.{b}.attentions.{l}", f"output_blocks.{index}.1", "plain"))
            index += 1
        if b != n - 1:
            rows.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index - 1}.{2 if attends else 1}.conv", "plain"))
    return rows


def unet_to_ldm(sd: dict, config: dict) -> dict:
    rows = sorted(_module_map_unet(config), key=lambda r: -len(r[0]))
    out = {}
    for key, value in sd.items():
        for ours, theirs, kind in rows:
            if key.startswith(ours + "."):
                rest = key[len(ours) + 1:]
                if kind == "resnet":
                    for a, b in UNET_RESNET:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a):]
                            break
                out["model.diffusion_model." + theirs + "." + rest] = value
                break
        else:
            raise KeyError(f"test mapping has no row for UNet key {key}")
    return out


def vae_to_ldm(sd: dict, config: dict, prefix: str = "first_stage_model.") -> dict:
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    rows = [("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_norm_out", "decoder.norm_out")]
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1"), (f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")]
        rows += [(f"{side}.mid_block.attentions.0.{a}", f"{side}.mid.attn_1.{b}") for a, b in VAE_ATTN]
    for b in range(n):
        for l in range(lpb):
            rows.append((f"encoder.down_blocks.{b}.resnets.{l}", f"encoder.down.{b}.block.{l}"))
        rows.append((f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"))
        for l in range(lpb + 1):
            rows.append((f"decoder.up_blocks.{b}.resnets.{l}", f"decoder.up.{n - 1 - b}.block.{l}"))
        rows.append((f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{n - 1 - b}.upsample.conv"))
    rows.sort(key=lambda r: -len(r[0]))
    out = {}
    for key, value in sd.items():
        new = key
        for ours, theirs in rows:
            if key.startswith(ours + "."):
                new = theirs + key[len(ours):]
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # the original stores 1x1 convolutions
        out[prefix + new] = value
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModel -> OpenAI layout (the same keys under the prefix)."""
    return {prefix + k: v for k, v in sd.items() if not k.endswith("position_ids") and k.startswith("text_model.")}


def open_clip_to_ldm(sd: dict, prefix: str, layers: int, extra_layer: bool, seed: int = 0) -> dict:
    """transformers CLIP -> OpenCLIP layout; ``extra_layer``: one more random resblock (SD 2.x drops it)."""
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            for a, b in names.items():
                out[dst + f"{b}.{part}"] = sd[src + f"{a}.{part}"]
    if extra_layer:
        g = torch.Generator().manual_seed(seed)
        for key in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.{layers - 1}.")]:
            out[key.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")] = torch.randn(out[key].shape, generator=g)
    return out


def _component_sd(folder: Path, name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    sub = folder / name
    files = sorted(sub.glob("*.safetensors"))
    return load_file(str(files[0])), json.loads((sub / "config.json").read_text())


def pipeline_to_ldm(folder: Path, text_layouts: dict) -> dict:
    """A diffusers pipeline folder -> one original-layout state dict.

    ``text_layouts``: component -> (layout, prefix, extra_layer) with layout "clip" or "open_clip".
    """
    unet, unet_config = _component_sd(folder, "unet")
    vae, vae_config = _component_sd(folder, "vae")
    out = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config)}
    for name, (layout, prefix, extra) in text_layouts.items():
        sd, config = _component_sd(folder, name)
        if not any(k.startswith("text_model.") for k in sd):  # transformers 5 saves CLIPTextModel unprefixed
            sd = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sd.items()}
        if layout == "clip":
            out.update(clip_to_ldm(sd, prefix))
        else:
            out.update(open_clip_to_ldm(sd, prefix, config["num_hidden_layers"], extra))
    return out


def write(sd: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
