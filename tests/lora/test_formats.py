"""LoRA file formats (runtime/lora/formats.py): every format gives the module paths and delta
weights of the PEFT original, and diffusers' own reading of the same file agrees.

The files are written here from one set of random peft adapters (tests/lora/conftest.py) by the
name mappings of each format; the sgm (SDXL Kohya) names come from the single-file converter
(runtime/models/single_file/unet_keys.py), not from the code under test.
"""
from __future__ import annotations

import json

import pytest
import torch

from runtime.lora import formats, kohya
from runtime.lora.formats import lora_family, parse_lora
from runtime.lora.unet_names import unet_modules
from runtime.models.errors import LoraError

from lora_cases import diffusers_deltas

ATOL = 1e-6


def deltas(parsed) -> dict:
    return {c: {m: layer.delta_weight() for m, layer in layers.items()} for c, layers in parsed.items()}


def assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: components {sorted(got)} != {sorted(want)}"
    for component in want:
        g, w = got[component], want[component]
        assert sorted(g) == sorted(w), (f"{what} {component}: only ours {sorted(set(g) - set(w))[:5]}, "
                                        f"only theirs {sorted(set(w) - set(g))[:5]}")
        for module in w:
            a, b = g[module], w[module].reshape(g[module].shape)
            assert torch.allclose(a, b, atol=ATOL, rtol=1e-5), \
                f"{what} {component}.{module}: max diff {(a - b).abs().max().item():.3g}"


# ---- writers: the same weights in each format ---------------------------------------------
def sgm_paths(case) -> dict:
    """diffusers UNet module path -> sgm path, by the single-file converter over the UNet's keys."""
    from runtime.models.single_file.unet_keys import to_original

    keys = {k: None for k in case.base["unet"].state_dict()}
    original = to_original(keys, case.unet_config.layers_per_block)
    return {k[: -len(".weight")]: o[: -len(".weight")] for k, o in zip(keys, original) if k.endswith(".weight")}


def kohya_file(case, sgm: bool = False, alpha="file") -> dict:
    """Kohya names; ``alpha``: "file" (each layer's own), a number for all, or None (no alpha keys)."""
    paths = sgm_paths(case) if sgm else {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sgm else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for component in case.peft:
        for module, a, b in case.layers(component):
            name = prefixes[component] + (paths.get(module, module) if component == "unet" else module).replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
            if alpha is not None:
                value = case.alphas[component][module] if alpha == "file" else alpha
                out[f"{name}.alpha"] = torch.tensor(value, dtype=torch.float16)
    return out


PROCESSOR = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
CLIP_PROCESSOR = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def older_file(case, prefix: bool = True) -> dict:
    """Older diffusers names: attention processors' ``to_q_lora``, ``.lora.down``, ``lora_linear_layer``."""
    out = {}
    for component in case.peft:
        head = f"{component}." if prefix else ""
        for module, a, b in case.layers(component):
            parent, _, leaf = module.rpartition(".")
            if component == "unet" and module.endswith("to_out.0"):
                parent, leaf = module[: -len(".to_out.0")], "to_out.0"
            if component == "unet" and leaf in PROCESSOR:
                name = f"{parent}.processor.{PROCESSOR[leaf]}"
            elif component == "unet":
                name = f"{module}.lora"
            elif leaf in CLIP_PROCESSOR and leaf != "k_proj":
                name = f"{parent}.{CLIP_PROCESSOR[leaf]}"
            else:  # k_proj and the MLP: lora_linear_layer (both spellings in one file, as diffusers wrote them)
                name = f"{module}.lora_linear_layer"
            out[f"{head}{name}.down.weight"], out[f"{head}{name}.up.weight"] = a, b
    return out


def unscaled(case) -> dict:
    """Each layer's up @ down (alpha = rank)."""
    from runtime.lora.weights import LoraLayer

    return {c: {m: LoraLayer(a, b).delta_weight() for m, a, b in case.layers(c)} for c in case.peft}


# ---- PEFT / current diffusers ---------------------------------------------------------------
def save_peft(case, folder):
    """diffusers' save_lora_weights with each component's LoraConfig as metadata (what its training
    scripts write); returns (state dict, safetensors metadata) read back from the file."""
    from safetensors import safe_open

    layers = {f"{c}_lora_layers" if c != "unet" else "unet_lora_layers": sd for c, sd in case.peft.items()}
    meta = {f"{c}_lora_adapter_metadata": cfg for c, cfg in case.config.items()}
    case.pipeline.save_lora_weights(str(folder), **layers, **meta)
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata(), path


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_peft_file_with_metadata(name, request, tmp_path):
    case = request.getfixturevalue(f"{name}_case")
    state, meta, path = save_peft(case, tmp_path)
    stored = json.loads(meta[formats.METADATA_KEY])
    assert stored["unet.lora_alpha"] == 8 and stored["unet.alpha_pattern"] == {"to_k": 3.0, "conv_in": 1.0}
    ours = deltas(parse_lora(state, case.unet_config, metadata=meta))
    assert_same(ours, case.truth, "PEFT + metadata vs peft")
    assert_same(ours, diffusers_deltas(case, str(path)), "PEFT + metadata vs diffusers")
    # the metadata already parsed (diffusers' lora_state_dict(return_lora_metadata=True) form) reads the same
    assert_same(deltas(parse_lora(state, metadata=stored)), case.truth, "parsed metadata")


def test_peft_without_metadata_is_alpha_rank(sd_case):
    ours = parse_lora(sd_case.peft_file())
    assert all(layer.alpha is None and layer.scale == 1.0 for layers in ours.values() for layer in layers.values())
    assert_same(deltas(ours), unscaled(sd_case), "PEFT, no metadata")


def test_transformers5_clip_names_get_text_model(sd_case):
    """transformers 5.x's CLIPTextModel saves encoder.layers...; our module paths keep text_model."""
    te = sd_case.peft["text_encoder"]
    assert next(iter(te)).startswith("encoder.layers.")  # what peft saved from transformers 5.x
    parsed = parse_lora({f"text_encoder.{k}": v for k, v in te.items()})
    assert all(m.startswith("text_model.encoder.layers.") for m in parsed["text_encoder"])


def test_rslora_metadata_scale(sd_case):
    state = {f"text_encoder.{k}": v for k, v in sd_case.peft["text_encoder"].items()}
    meta = {"text_encoder.r": 4, "text_encoder.lora_alpha": 8, "text_encoder.use_rslora": True}
    layer = next(iter(parse_lora(state, metadata=meta)["text_encoder"].values()))
    assert layer.scale == pytest.approx(8 / 2)  # PEFT's rsLoRA: alpha / sqrt(r)


# ---- older diffusers --------------------------------------------------------------------
def test_older_diffusers_names(sd_case):
    file = older_file(sd_case)
    assert any(".processor.to_out_lora.down.weight" in k for k in file)
    assert any(".self_attn.to_q_lora.up.weight" in k for k in file)
    assert any(".mlp.fc1.lora_linear_layer.down.weight" in k for k in file)
    assert any(".conv1.lora.down.weight" in k for k in file)
    ours = deltas(parse_lora(file))
    assert_same(ours, unscaled(sd_case), "older diffusers vs peft's up @ down")
    assert_same(ours, diffusers_deltas(sd_case, file), "older diffusers vs diffusers")


def test_older_unet_file_without_prefix(sd_case):
    """The old attention-processor files had no ``unet.`` prefix; read as the UNet's."""
    file = {k: v for k, v in older_file(sd_case, prefix=False).items() if not k.startswith("text_model")}
    assert_same(deltas(parse_lora(file)), {"unet": unscaled(sd_case)["unet"]}, "bare older UNet file")
    model = formats.parse_component(file, "unet")
    assert sorted(model) == sorted(sd_case.truth["unet"])
    prefixed = formats.parse_component(sd_case.peft_file(), "unet", prefix="unet")
    assert sorted(prefixed) == sorted(sd_case.truth["unet"])
    assert formats.parse_component(sd_case.peft_file(), "unet", prefix="transformer") == {}


# ---- Kohya / A1111 --------------------------------------------------------------------------
def test_kohya_sd1(sd_case):
    file = kohya_file(sd_case)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in file
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in file
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in file
    for config in (None, sd_case.unet_config):  # the grammar, and the config's module table
        assert_same(deltas(parse_lora(file, config)), sd_case.truth, f"Kohya SD1 (config={config is not None})")
    # diffusers' conversion: its names + network_alphas read back to the same layers
    state, alphas = sd_case.pipeline.lora_state_dict(dict(file))
    assert_same(deltas(parse_lora(state, network_alphas=alphas)), sd_case.truth, "diffusers' Kohya conversion")
    # and what diffusers loads; one alpha for all (diffusers drops the per-module alphas of attention
    # layers: its alpha_pattern keys keep ".processor.to_k_lora.down.weight")
    one = kohya_file(sd_case, alpha=6.0)
    assert_same(deltas(parse_lora(one)), diffusers_deltas(sd_case, one), "Kohya SD1 vs diffusers")


def test_kohya_sdxl_sgm_names(sdxl_case):
    file = kohya_file(sdxl_case, sgm=True)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_3_0_op", "lora_unet_time_embed_0",
                 "lora_unet_label_emb_0_0", "lora_unet_input_blocks_0_0", "lora_unet_out_2",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_output_blocks_0_0_skip_connection",
                 "lora_unet_middle_block_2_emb_layers_1", "lora_unet_input_blocks_5_1_transformer_blocks_1_ff_net_2",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
        assert f"{name}.lora_down.weight" in file, name
    assert lora_family(file) == "SDXL (Kohya, lora_te1_/lora_te2_)"
    assert_same(deltas(parse_lora(file, sdxl_case.unet_config)), sdxl_case.truth, "Kohya SDXL sgm")
    state, alphas = sdxl_case.pipeline.lora_state_dict(dict(file), unet_config=sdxl_case.unet_config)
    assert_same(deltas(parse_lora(state, network_alphas=alphas)), sdxl_case.truth, "diffusers' sgm conversion")
    one = kohya_file(sdxl_case, sgm=True, alpha=6.0)
    assert_same(deltas(parse_lora(one, sdxl_case.unet_config)), diffusers_deltas(sdxl_case, one), "sgm vs diffusers")


def test_kohya_sdxl_diffusers_names_and_no_alpha(sdxl_case):
    file = kohya_file(sdxl_case, alpha="file")
    assert_same(deltas(parse_lora(file, sdxl_case.unet_config)), sdxl_case.truth, "Kohya SDXL, diffusers names")
    bare = kohya_file(sdxl_case, alpha=None)
    assert not any(k.endswith(".alpha") for k in bare)
    assert_same(deltas(parse_lora(bare)), unscaled(sdxl_case), "Kohya without alpha: alpha = rank")


def test_locon_convs_3x3_down_1x1_up(sd_case):
    parsed = parse_lora(kohya_file(sd_case), sd_case.unet_config)["unet"]
    conv = parsed["down_blocks.0.resnets.0.conv1"]
    assert conv.down.shape[1:] == (32, 3, 3) and conv.up.shape[2:] == (1, 1) and conv.rank == 2
    assert conv.scale == 8 / 2
    for module in ("conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
                   "up_blocks.1.resnets.0.conv_shortcut", "down_blocks.1.resnets.0.time_emb_proj",
                   "time_embedding.linear_1"):
        assert module in parsed, module
    assert parsed["conv_in"].scale == 1.0 / 4
    assert parsed["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].scale == 3.0 / 4


def test_writers_out_roundtrip(sd_case, sdxl_case, tmp_path):
    """to_peft / to_kohya (the saver's names out) read back the same, and diffusers loads to_peft's file."""
    from safetensors.torch import save_file

    parsed = parse_lora(sd_case.peft_file(), metadata={f"{c}.{k}": v for c, cfg in sd_case.config.items()
                                                        for k, v in cfg.items() if k in ("r", "lora_alpha",
                                                                                         "alpha_pattern", "rank_pattern")})
    assert_same(deltas(parsed), sd_case.truth, "prefixed metadata dict")
    state, meta = formats.to_peft(parsed)
    assert_same(deltas(parse_lora(state, metadata=meta)), sd_case.truth, "to_peft")
    assert_same(deltas(parse_lora(formats.to_kohya(parsed))), sd_case.truth, "to_kohya")
    xl = parse_lora(kohya_file(sdxl_case, sgm=True), sdxl_case.unet_config)
    sgm = formats.to_kohya(xl, sdxl_case.unet_config, sgm=True)
    assert sorted(sgm) == sorted(kohya_file(sdxl_case, sgm=True))
    assert_same(deltas(parse_lora(sgm, sdxl_case.unet_config)), sdxl_case.truth, "to_kohya sgm")
    path = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    assert_same(diffusers_deltas(sd_case, str(path)), sd_case.truth, "diffusers reads to_peft")


# ---- name tables --------------------------------------------------------------------------
UNETS = {
    "sd15": {},
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True, attention_head_dim=(5, 10, 20)),
    "odd": dict(block_out_channels=(32, 64, 64), layers_per_block=[1, 2, 1], norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                transformer_layers_per_block=[1, [1, 2], 2], reverse_transformer_layers_per_block=[[1, 2], [1, 1, 1], [3, 1]],
                cross_attention_dim=32, attention_head_dim=8, mid_block_type="UNetMidBlock2D", time_cond_proj_dim=16,
                class_embed_type="timestep"),
}


@pytest.mark.parametrize("name", sorted(UNETS))
def test_unet_module_table_is_diffusers_unet(name):
    """Every Linear/Conv2d of diffusers' UNet (built on meta) and nothing else; sgm names as the
    single-file converter writes them (uniform layers_per_block)."""
    from diffusers import UNet2DConditionModel
    from torch import nn

    from runtime.models.single_file.unet_keys import to_original

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNETS[name])
    real = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    table = unet_modules(unet.config)
    assert sorted(table) == sorted(real)
    if name != "odd":  # our UNet has diffusers' module paths
        from runtime.models.unet_2d_condition import UNet2DConditionModel as Ours

        with torch.device("meta"):
            ours = Ours(**UNETS[name])
        assert sorted(table) == sorted(n for n, m in ours.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(unet.config.layers_per_block, int):
        keys = {k: None for k in unet.state_dict()}
        original = dict(zip(keys, to_original(keys, unet.config.layers_per_block)))
        assert {m: s for m, s in table.items() if s} == {m: original[m + ".weight"][:-7] for m in table
                                                         if m + ".weight" in original and table[m]}


def test_sgm_upsampler_without_attention_is_index_1():
    """SD 1.x's layout in sgm names: up_blocks.0 is an UpBlock2D, its upsampler output_blocks.2.1.conv."""
    config = {"block_out_channels": (32, 64), "layers_per_block": 1,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
    assert kohya.unet_module("output_blocks_1_1_conv", config) == "up_blocks.0.upsamplers.0.conv"
    assert kohya.unet_module("output_blocks_2_1_proj_in", config) == "up_blocks.1.attentions.0.proj_in"
    assert kohya.unet_module("input_blocks_2_0_op", config) == "down_blocks.0.downsamplers.0.conv"
    assert kohya.unet_module("input_blocks_1_1_proj_in", config) == "down_blocks.0.attentions.0.proj_in"
    assert kohya.unet_module("input_blocks_3_1_proj_in", config) is None  # down_blocks.1 has no attention


def test_family_strings(sd_case, sdxl_case):
    t = torch.zeros(4, 4)
    assert lora_family(kohya_file(sd_case)) == "SD 1.x/2.x UNet (Kohya)"
    assert lora_family({k: v for k, v in kohya_file(sdxl_case, sgm=True).items() if "lora_unet" in k}) \
        == "SDXL UNet (Kohya, sgm names)"
    assert lora_family(sd_case.peft_file()) == "SD/SDXL UNet (PEFT/diffusers)"
    assert lora_family(sdxl_case.peft_file()) == "SDXL (PEFT/diffusers)"
    assert lora_family(older_file(sd_case)) == "SD/SDXL UNet (older diffusers)"
    assert lora_family({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
                        torch.zeros(4, 768)}) == "SD 1.x (PEFT/diffusers)"
    assert lora_family({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": t}) == "Flux transformer (Kohya)"
    assert lora_family({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": t}) \
        == "Flux/SD3 transformer (PEFT/diffusers)"
    assert lora_family({"string_to_param": {"*": t}}) == "textual inversion embedding (not a LoRA)"
    assert lora_family({"conv_in.weight": t}) == "not a LoRA (no LoRA keys)"


def test_input_is_not_mutated(sdxl_case):
    file = kohya_file(sdxl_case, sgm=True)
    before = dict(file)
    parse_lora(file, sdxl_case.unet_config)
    assert list(file) == list(before) and all(file[k] is before[k] for k in before)


# ---- bad input: each error names the key or value -------------------------------------------
def _one(name, rank=4, up_rank=None, cin=32, cout=32, sep="lora_down.weight|lora_up.weight"):
    down, up = sep.split("|")
    return {f"{name}.{down}": torch.zeros(rank, cin), f"{name}.{up}": torch.zeros(cout, up_rank or rank)}


def test_error_no_lora_keys():
    with pytest.raises(LoraError, match=r"no LoRA keys .*'conv_in.weight', 'conv_in.bias'.*not a LoRA"):
        parse_lora({"conv_in.weight": torch.zeros(1), "conv_in.bias": torch.zeros(1)})
    with pytest.raises(LoraError, match="empty"):
        parse_lora({})


def test_error_dora():
    name = "unet.down_blocks.1.attentions.0.proj_in"
    state = _one(name, sep="lora_A.weight|lora_B.weight")
    with pytest.raises(LoraError, match=rf"'{name}.lora_magnitude_vector'.*DoRA"):
        parse_lora({**state, f"{name}.lora_magnitude_vector": torch.ones(32)})
    kohya_state = _one("lora_unet_conv_in")
    with pytest.raises(LoraError, match=r"'lora_unet_conv_in.dora_scale'.*DoRA"):
        parse_lora({**kohya_state, "lora_unet_conv_in.dora_scale": torch.ones(1, 32)})
    with pytest.raises(LoraError, match=r"use_dora.*DoRA"):
        parse_lora(state, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.use_dora": True})})
    with pytest.raises(LoraError, match=r"'lora_unet_conv_in.hada_w1_a'.*LoHa"):
        parse_lora({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)})


def test_error_unknown_key_names_key_and_family(sd_case):
    flux = r"'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight'.*Flux transformer \(Kohya\)"
    with pytest.raises(LoraError, match=flux):
        parse_lora(_one("lora_unet_double_blocks_0_img_attn_qkv"))
    with pytest.raises(LoraError, match=r"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight'.*Flux/SD3"):
        parse_lora(_one("transformer.transformer_blocks.0.attn.to_q", sep="lora_A.weight|lora_B.weight"))
    # an SD 1.x LoRA for a UNet without attention in down_blocks.0: the config's table has no such module
    sd1 = kohya_file(sd_case)
    bad = _one("lora_unet_down_blocks_0_attentions_0_proj_in")
    with pytest.raises(LoraError, match=r"'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight' names no "
                                        r"module of this UNet.*SD 1.x/2.x UNet \(Kohya\)"):
        parse_lora({**sd1, **bad}, sd_case.unet_config)
    with pytest.raises(LoraError, match=r"'lora_te_text_model_encoder_layers_0_foo.lora_up.weight'.*CLIP"):
        parse_lora({**sd1, **_one("lora_te_text_model_encoder_layers_0_foo", sep="lora_up.weight|lora_down.weight")})
    with pytest.raises(LoraError, match=r"'lora_unet_input_blocks_1_0_in_layers_2.*sgm.*unet_config"):
        parse_lora(_one("lora_unet_input_blocks_1_0_in_layers_2"))
    with pytest.raises(LoraError, match=r"'unet.conv_in.lora_A.bias' is a LoRA bias"):
        parse_lora({**_one("unet.conv_in", sep="lora_A.weight|lora_B.weight"), "unet.conv_in.lora_A.bias": torch.zeros(4)})
    mixed = {**sd_case.peft_file(), "conv_in.lora_A.weight": torch.zeros(4, 4)}
    with pytest.raises(LoraError, match=r"'conv_in.lora_A.weight' is for 'conv_in'"):
        parse_lora(mixed)


def test_error_rank_mismatch_and_missing_half():
    with pytest.raises(LoraError, match=r"unet.conv_in .*up \(32, 3\) has rank 3, down \(4, 32\) has rank 4"):
        parse_lora(_one("lora_unet_conv_in", up_rank=3))
    with pytest.raises(LoraError, match=r"unet.conv_in \(key 'lora_unet_conv_in.lora_down.weight'\) has no up weight"):
        parse_lora({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 32)})
    with pytest.raises(LoraError, match=r"'lora_unet_conv_in.alpha' has shape \(2,\)"):
        parse_lora({**_one("lora_unet_conv_in"), "lora_unet_conv_in.alpha": torch.ones(2)})
    with pytest.raises(LoraError, match=r"both give the down of unet.down_blocks.0.resnets.0.conv1"):
        parse_lora({**_one("unet.down_blocks.0.resnets.0.conv1", sep="lora_A.weight|lora_B.weight"),
                    **_one("unet.down_blocks.0.resnets.0.conv1.lora", sep="down.weight|up.weight")})


def test_error_malformed_metadata():
    state = _one("unet.conv_in", sep="lora_A.weight|lora_B.weight")
    with pytest.raises(LoraError, match="'lora_adapter_metadata' is not JSON"):
        parse_lora(state, metadata={"lora_adapter_metadata": "{unet.r: 4"})
    with pytest.raises(LoraError, match="'lora_adapter_metadata' is not a JSON object"):
        parse_lora(state, metadata={"lora_adapter_metadata": "[4]"})
    with pytest.raises(LoraError, match=r"unet.lora_alpha='eight': expected a finite number"):
        parse_lora(state, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": "eight"})})
    with pytest.raises(LoraError, match=r"gives unet.conv_in rank 8, but its weights have rank 4"):
        parse_lora(state, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})})
    with pytest.raises(LoraError, match=r"alpha_pattern: pattern '\(' is not a regex"):
        parse_lora(state, metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.alpha_pattern": {"(": 1}})})
