"""Tiny UNet2DConditionModel configs (diffusers' keys) shaped like SD1, SD2, SDXL and inpainting,
and builders that make a seeded diffusers reference plus our model with the same weights."""
from __future__ import annotations

import copy

import torch

_SD1 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 32, 32],
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=2,  # diffusers' quirk: the head COUNT
)

UNET_CONFIGS: dict[str, dict] = {
    "sd1": _SD1,
    "sd2": {
        **_SD1,
        "use_linear_projection": True,
        "upcast_attention": True,
        "attention_head_dim": [2, 4, 8],
        "layers_per_block": [1, 2, 1],
    },
    "sdxl": dict(
        sample_size=16,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[16, 32],
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8,  # pooled text (12) + 6 time ids x 8
    ),
    "inpaint": {**_SD1, "in_channels": 9},
    "lcm": {**_SD1, "time_cond_proj_dim": 8, "timestep_post_act": "silu"},
}

SDXL_TEXT_EMBED_DIM = 12


def unet_config(name: str, **overrides) -> dict:
    return {**copy.deepcopy(UNET_CONFIGS[name]), **overrides}


def unet_inputs(config: dict, batch: int = 2, height: int = 16, width: int = 16, seq: int = 7, seed: int = 1):
    """Random forward arguments (as a kwargs dict) that fit ``config``."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        sample=torch.randn(batch, config.get("in_channels", 4), height, width, generator=g),
        timestep=torch.tensor([10.0, 500.0][:batch] + [999.0] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, seq, config["cross_attention_dim"], generator=g),
    )
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, SDXL_TEXT_EMBED_DIM, generator=g),
            time_ids=torch.tensor([[height * 8.0, width * 8.0, 0.0, 0.0, height * 8.0, width * 8.0]] * batch),
        )
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"], generator=g)
    return kwargs


def build_unet_pair(name: str, seed: int = 0, **overrides):
    """(diffusers reference, ours) in eval mode with identical weights; our load is strict."""
    import diffusers

    from runtime.models import UNet2DConditionModel

    config = unet_config(name, **overrides)
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel.from_config(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, config


# Real-size configs as the hub's config.json files hold them (for meta-device shape checks only).
_SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
FULL_UNET_CONFIGS: dict[str, dict] = {
    "sd15": _SD15,
    "sd15-inpainting": {**_SD15, "in_channels": 9},
    "sd21": {
        **_SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
        "only_cross_attention": False, "resnet_time_scale_shift": "default", "sample_size": 96,
        "upcast_attention": True, "use_linear_projection": True, "class_embed_type": None,
    },
    "sdxl": {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
        "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": 2048, "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
        "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True,
    },
}
