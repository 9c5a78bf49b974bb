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

    from models import UNet2DConditionModel

    config = unet_config(name, **overrides)
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel.from_config(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, config
