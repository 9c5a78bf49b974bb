"""``original_config=``: the LDM training yaml (v1-inference.yaml, v2-inference-v.yaml, sd_xl_base.yaml
...) turned into diffusers configs, by diffusers' rules: ``model_channels * channel_mult`` widths,
``attention_resolutions`` for which blocks attend, ``num_heads`` / ``num_head_channels``,
``context_dim``, ``use_linear_in_transformer``, ``transformer_depth``, ``adm_in_channels``; the VAE's
``ddconfig``; ``scale_factor``; ``parameterization: v`` for v-prediction. Parsed with
``yaml.safe_load`` (PyYAML), never a loader that builds objects.
"""
from __future__ import annotations


from pathlib import Path

from ..errors import ConfigError


def load(original_config) -> dict:
    if isinstance(original_config, dict):
        return original_config
    text = str(original_config)
    if "\n" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"original_config={text!r}: not a file (the LDM yaml must be local here: no downloads)")
        text = path.read_text(encoding="utf-8")
    try:
        import yaml
    except ModuleNotFoundError:  # pragma: no cover - PyYAML is a dependency
        raise ConfigError("original_config needs PyYAML (pip install PyYAML)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"original_config: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError("original_config: expected an LDM config with a top-level 'model' section")
    return data


def configs(original_config, checkpoint: dict | None = None) -> dict:
    """{"unet": ..., "vae": ..., "prediction_type": ...} from the yaml."""
    data = load(original_config)
    params = data["model"].get("params", {})
    unet = (params.get("unet_config") or params.get("network_config") or {}).get("params")
    vae = ((params.get("first_stage_config") or {}).get("params") or {}).get("ddconfig")
    if unet is None or vae is None:
        raise ConfigError("original_config: no unet_config / network_config or first_stage_config.ddconfig in model.params")
    mult = list(vae["ch_mult"])
    image = 1024 if unet.get("context_dim") in (2048, 1280) else (768 if params.get("parameterization") == "v" else 512)
    return {
        "unet": unet_config(unet, image // 2 ** (len(mult) - 1)),
        "vae": {
            "in_channels": vae["in_channels"], "out_channels": vae["out_ch"],
            "down_block_types": ["DownEncoderBlock2D"] * len(mult), "up_block_types": ["UpDecoderBlock2D"] * len(mult),
            "block_out_channels": [vae["ch"] * m for m in mult], "latent_channels": vae["z_channels"],
            "layers_per_block": vae["num_res_blocks"], "sample_size": image,
            "scaling_factor": params.get("scale_factor", 0.18215),
        },
        "prediction_type": "v_prediction" if params.get("parameterization") == "v" else "epsilon",
    }


def unet_config(p: dict, sample_size: int) -> dict:
    channels = [p["model_channels"] * m for m in p["channel_mult"]]
    resolutions = list(p.get("attention_resolutions") or [])
    down, up, res = [], [], 1
    for i in range(len(channels)):
        down.append("CrossAttnDownBlock2D" if res in resolutions else "DownBlock2D")
        if i != len(channels) - 1:
            res *= 2
    for _ in channels:
        up.append("CrossAttnUpBlock2D" if res in resolutions else "UpBlock2D")
        res //= 2
    context = p.get("context_dim")
    context = context[0] if isinstance(context, (list, tuple)) else context
    heads = p.get("num_heads") if p.get("num_heads", -1) != -1 else None
    if heads is None and p.get("num_head_channels"):
        heads = [c // p["num_head_channels"] for c in channels]
    depth = p.get("transformer_depth") or 1
    config = {
        "sample_size": sample_size, "in_channels": p["in_channels"], "out_channels": p["out_channels"],
        "down_block_types": down, "up_block_types": up, "block_out_channels": channels,
        "layers_per_block": p["num_res_blocks"], "cross_attention_dim": context,
        "attention_head_dim": heads if heads is not None else 8,
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
    }
    if p.get("num_classes") == "sequential":
        if context in (2048, 1280):
            config.update(addition_embed_type="text_time", addition_time_embed_dim=256)
        else:
            config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = p["adm_in_channels"]
    if "disable_self_attentions" in p:
        config["only_cross_attention"] = p["disable_self_attentions"]
    return config



