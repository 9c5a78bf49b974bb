"""Every file format end to end: the same adapters written as Kohya (SD 1.x names, SDXL's sgm names)
and as older diffusers names load into diffusers and into ours and give the same latents.

The files are written from a PEFT file made by diffusers + peft (conftest.py) through our name
mapping (runtime/lora/formats.py ``to_kohya``); diffusers' reading of each file is the reference."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_helpers import latents, lora_file, ours, reference
from runtime.lora.formats import parse_lora
from runtime.models.safetensors_io import load_safetensors

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _parsed(folder, pipe):
    from runtime.models.safetensors_io import read_header

    meta = read_header(lora_file(folder)).get("__metadata__")
    return parse_lora(load_safetensors(lora_file(folder)), unet_config=pipe.unet.config, metadata=meta)


def _kohya_file(parsed, pipe, tmp_path, sgm: bool):
    from runtime.lora.formats import to_kohya

    path = tmp_path / ("sgm.safetensors" if sgm else "kohya.safetensors")
    save_file({k: v.contiguous() for k, v in to_kohya(parsed, pipe.unet.config, sgm=sgm).items()}, str(path))
    return path


def _pair(folder, cls, path):
    ref, mine = reference(folder, cls), ours(folder, cls)
    ref.load_lora_weights(str(path), adapter_name="k")
    mine.load_lora_weights(str(path), adapter_name="k")
    return ref, mine


TOL = 1e-4  # fp32 latents, max-abs (lora_helpers.close's default)


def _differences(folder, cls, path, base) -> tuple[float, float]:
    """``path`` loaded into diffusers and into ours: the max-abs difference of our latents from diffusers',
    and from ``base``'s (without the adapters)."""
    ref, mine = _pair(folder, cls, path)
    got = latents(mine)
    return float((got - latents(ref)).abs().max()), float((got - latents(base)).abs().max())


def test_kohya_sd1_file_matches_diffusers(sd_folder, sd_lora, tmp_path):
    base = ours(sd_folder)
    # diffusers' Kohya reader keeps convolution LoRAs of resnets but not of conv_in/out and samplers: leave those out
    parsed = _parsed(sd_lora, base)
    parsed["unet"] = {p: l for p, l in parsed["unet"].items() if p.startswith(("down_blocks", "mid_block", "up_blocks"))
                      and "samplers" not in p}
    path = _kohya_file(parsed, base, tmp_path, sgm=False)
    assert any(k.startswith("lora_unet_down_blocks_") for k in load_safetensors(path))
    vs_diffusers, vs_base = _differences(sd_folder, "StableDiffusionPipeline", path, base)
    assert vs_diffusers <= TOL and vs_base > 1e-3  # same as diffusers, and the adapters changed the result


def test_kohya_sdxl_sgm_file_matches_diffusers(sdxl_folder, sdxl_lora, tmp_path):
    base = ours(sdxl_folder, "StableDiffusionXLPipeline")
    parsed = _parsed(sdxl_lora, base)
    parsed["unet"] = {p: l for p, l in parsed["unet"].items() if any(p.endswith(t) for t in ATTENTION)
                      or ".resnets." in p}
    path = _kohya_file(parsed, base, tmp_path, sgm=True)
    keys = load_safetensors(path)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    vs_diffusers, vs_base = _differences(sdxl_folder, "StableDiffusionXLPipeline", path, base)
    assert vs_diffusers <= TOL and vs_base > 1e-3  # same as diffusers, and the adapters changed the result


def test_older_diffusers_attention_processor_file_matches_diffusers(sd_folder, sd_lora, tmp_path):
    base = ours(sd_folder)
    parsed = _parsed(sd_lora, base)
    state = {}
    for path, layer in parsed["unet"].items():
        attn, _, proj = path.rpartition(".to_")
        if not any(path.endswith(t) for t in ATTENTION):
            continue
        name = {"q": "to_q_lora", "k": "to_k_lora", "v": "to_v_lora", "out.0": "to_out_lora"}[proj]
        state[f"unet.{attn}.processor.{name}.down.weight"] = layer.down.contiguous()
        state[f"unet.{attn}.processor.{name}.up.weight"] = (layer.up * layer.scale).contiguous()  # alpha = rank
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    vs_diffusers, vs_base = _differences(sd_folder, "StableDiffusionPipeline", path, base)
    assert vs_diffusers <= TOL and vs_base > 1e-3  # same as diffusers, and the adapters changed the result


def test_model_level_load_reads_kohya_names_without_prefix(sd_folder, sd_lora, tmp_path):
    """``unet.load_lora_adapter(kohya_state_dict, prefix=None)``: Kohya names say whose they are."""
    base = ours(sd_folder)
    parsed = {"unet": {p: l for p, l in _parsed(sd_lora, base)["unet"].items() if ".attentions." in p}}
    path = _kohya_file(parsed, base, tmp_path, sgm=False)
    by_pipe, by_model = ours(sd_folder), ours(sd_folder)
    by_pipe.load_lora_weights(str(path), adapter_name="k")
    by_model.unet.load_lora_adapter(load_safetensors(path), prefix=None, adapter_name="k")
    assert torch.equal(latents(by_model), latents(by_pipe))
