"""OpenAI-CLIP text encoder keys (SD 1.x's ``cond_stage_model.transformer.``, SDXL's first encoder
``conditioner.embedders.0.transformer.``): the original files hold transformers' own layout under
that prefix, with or without the ``text_model.`` level (older files lack it). Config from shapes.
"""
from __future__ import annotations

import re

import torch

SD1_PREFIX = "cond_stage_model.transformer."
SDXL_PREFIX = "conditioner.embedders.0.transformer."
DROPPED = ("text_model.embeddings.position_ids",)  # a buffer some files carry; recomputed here
HEAD_DIM = 64  # OpenAI CLIP ViT-L/14's text tower: 768 wide, 12 heads


def to_diffusers(sd: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Prefix-stripped keys -> transformers' ``text_model.*`` layout; (state dict, unmapped keys)."""
    out, unmapped = {}, []
    for key, t in sd.items():
        new = key if key.startswith("text_model.") else "text_model." + key
        if new in DROPPED:
            continue
        if not new.startswith(("text_model.embeddings.", "text_model.encoder.", "text_model.final_layer_norm.")):
            unmapped.append(key)
            continue
        out[new] = t
    return out, unmapped


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIPTextModel's state dict is already the original layout under its prefix."""
    return {k: v for k, v in sd.items() if k.startswith("text_model.") and k not in DROPPED}


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """transformers' CLIPTextConfig keys from the shapes (``text_model.*`` keys).

    Heads are not in the keys: ``hidden_size // 64`` (OpenAI's ViT-L/14 rule), at least 1.
    ``eos_token_id=2`` selects the pooled token as the largest id, as the SD hub configs do.
    """
    emb = sd["text_model.embeddings.token_embedding.weight"]
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    hidden = int(emb.shape[1])
    return {
        "vocab_size": int(emb.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // HEAD_DIM),
        "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
