"""OpenCLIP text encoder keys (SD 2.x's ``cond_stage_model.model.``, SDXL base's second encoder
``conditioner.embedders.1.model.``, the refiner's ``conditioner.embedders.0.model.``).

OpenCLIP layout: ``token_embedding.weight``, ``positional_embedding`` (a bare tensor),
``transformer.resblocks.i.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}``, ``ln_final``, ``text_projection`` ``(width, embed_dim)`` used as ``x @ P`` (so
transformers' Linear weight is its transpose). ``in_proj`` stacks q, k, v along dim 0; the split
is three row-slices (views, no copy).

SD 2.x conditions on the penultimate layer: its text encoder is the first ``resblocks - 1``
layers (diffusers' 23 of 24), the last layer is dropped. Saving such an encoder writes one
more layer, a copy of the last, so the file has the count every SD 2.x loader expects.
"""
from __future__ import annotations

import re

import torch

SD2_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders.1.model."
REFINER_PREFIX = "conditioner.embedders.0.model."
HEAD_DIM = 64  # OpenCLIP ViT-H/14 (1024 wide, 16 heads) and ViT-bigG/14 (1280, 20)
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
LEAF = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj"}
LEAF_BACK = {v: k for k, v in LEAF.items()}


def num_resblocks(sd: dict) -> int:
    return len({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})


def to_diffusers(sd: dict[str, torch.Tensor], num_layers: int, projection: bool) -> tuple[dict, list[str]]:
    """Prefix-stripped OpenCLIP keys -> transformers' CLIP layout (first ``num_layers`` layers).

    ``projection``: keep ``text_projection`` (CLIPTextModelWithProjection). Returns (state dict,
    keys that map to nothing); dropped layers and an unused projection are not reported.
    """
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, t in sd.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = t
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = t
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final."):]] = t
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = t.t().contiguous()  # (width, dim) -> Linear (dim, width)
        elif m := _BLOCK.match(key):
            i, rest = int(m.group(1)), m.group(2)
            if i >= num_layers:
                continue
            base = f"text_model.encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                q, k, v = t.chunk(3, dim=0)
                leaf = rest.rsplit("_", 1)[1]
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{base}self_attn.{name}.{leaf}"] = part
                continue
            name, _, leaf = rest.rpartition(".")
            if name in LEAF:
                out[f"{base}{LEAF[name]}.{leaf}"] = t
            else:
                unmapped.append(key)
        elif key in ("logit_scale", "attn_mask") or key.startswith("visual."):
            continue  # OpenCLIP's image tower and contrastive scale: not part of a text encoder
        else:
            unmapped.append(key)
    return out, unmapped


def to_original(sd: dict[str, torch.Tensor], pad_layer: bool) -> dict[str, torch.Tensor]:
    """transformers-layout CLIP text encoder -> OpenCLIP layout (q/k/v stacked, projection transposed).

    ``pad_layer``: append a copy of the last layer (SD 2.x files hold one layer more than the
    penultimate-layer encoder uses).
    """
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for key, t in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
    for i in layers:
        base = f"text_model.encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{base}self_attn.{n}.{leaf}"] for n in ("q_proj", "k_proj", "v_proj")], dim=0)
            for ours, theirs in LEAF_BACK.items():
                out[f"transformer.resblocks.{i}.{theirs}.{leaf}"] = sd[f"{base}{ours}.{leaf}"]
    if pad_layer and layers:
        last, extra = layers[-1], layers[-1] + 1
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{last}.")]:
            out[key.replace(f"resblocks.{last}.", f"resblocks.{extra}.", 1)] = out[key].clone()
    return out


def infer_config(sd: dict[str, torch.Tensor], num_layers: int, projection: bool) -> dict:
    """CLIPTextConfig keys from OpenCLIP shapes; heads ``width // 64``; GELU (OpenCLIP's activation)."""
    emb = sd["token_embedding.weight"]
    hidden = int(emb.shape[1])
    proj = sd.get("text_projection")
    return {
        "vocab_size": int(emb.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": num_layers,
        "num_attention_heads": max(1, hidden // HEAD_DIM),
        "max_position_embeddings": int(sd["positional_embedding"].shape[0]),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": int(proj.shape[1]) if (projection and proj is not None) else hidden,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
