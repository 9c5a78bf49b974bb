"""Single-file type inference (a table over key sets, one per type) and bad input (issue 22)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).parent))
import single_file_reference as ref  # noqa: E402
from pipeline_fixtures import build_sd  # noqa: E402

import runtime  # noqa: E402
from runtime.models.errors import CheckpointError, ConfigError, ShapeMismatchError, UnsafeCheckpointError  # noqa: E402
from runtime.models.single_file import infer  # noqa: E402


def _meta_state(module) -> dict:
    return {k: v for k, v in module.state_dict().items()}


def _unet_keys(name: str) -> dict:
    config = {k: v for k, v in infer.standard_config(name)["unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    return ref.unet_to_ldm(_meta_state(unet), config)


def _vae_keys(prefix: str = "first_stage_model.") -> dict:
    config = {k: v for k, v in infer.standard_config("v1")["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**config)
    return ref.vae_to_ldm(_meta_state(vae), config, prefix)


def _text_keys(name: str, component: str, layout: str, prefix: str, extra: bool) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = {k: v for k, v in infer.standard_config(name)[component].items() if not k.startswith("_") and k != "architectures"}
    cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**config))
    sd = _meta_state(model)
    if not any(k.startswith("text_model.") for k in sd):
        sd = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sd.items()}
    if layout == "clip":
        return ref.clip_to_ldm(sd, prefix)
    out = {}
    meta = ref.open_clip_to_ldm({k: torch.empty(v.shape) if v.is_meta else v for k, v in sd.items()}, prefix,
                                config["num_hidden_layers"], False)
    out.update({k: torch.empty(v.shape, device="meta") for k, v in meta.items()})
    if extra:  # SD 2.x files hold a 24th layer
        last = config["num_hidden_layers"] - 1
        for k in [k for k in out if f"resblocks.{last}." in k]:
            out[k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = out[k]
    return out


@pytest.fixture(scope="module")
def key_sets():
    """type -> a full-size original-layout key set (meta tensors: shapes only, no memory)."""
    sd1 = dict(text_encoder=("clip", "cond_stage_model.transformer.", False))
    sd2 = dict(text_encoder=("open_clip", "cond_stage_model.model.", True))
    xl = dict(text_encoder=("clip", "conditioner.embedders.0.transformer.", False),
              text_encoder_2=("open_clip", "conditioner.embedders.1.model.", False))
    refiner = dict(text_encoder_2=("open_clip", "conditioner.embedders.0.model.", False))
    rows = {"v1": sd1, "inpainting": sd1, "v2": sd2, "inpainting_v2": sd2, "depth": sd2, "xl_base": xl,
            "xl_inpaint": xl, "xl_refiner": refiner}
    out = {}
    vae = _vae_keys()
    for name, texts in rows.items():
        sd = {**_unet_keys(name), **vae}
        for component, (layout, prefix, extra) in texts.items():
            sd.update(_text_keys(name, component, layout, prefix, extra))
        out[name] = sd
    out["vae"] = _vae_keys(prefix="")
    out["unet_v1"] = {k[len("model.diffusion_model."):]: v for k, v in out["v1"].items() if k.startswith("model.diffusion_model.")}
    out["v1_ema"] = {**out["v1"], **{"model_ema.diffusion_modelinput_blocks00weight": torch.empty(1)}}
    out["v1_old_clip"] = {k.replace("transformer.text_model.", "transformer."): v for k, v in out["v1"].items()}
    return out


TABLE = [
    # key set, type, family, standard UNet config, EMA present
    ("v1", "v1", "sd1", True, False),
    ("inpainting", "inpainting", "sd1", True, False),
    ("v2", "v2", "sd2", True, False),
    ("inpainting_v2", "inpainting_v2", "sd2", True, False),
    ("depth", "depth", "sd2", True, False),
    ("xl_base", "xl_base", "sdxl", True, False),
    ("xl_inpaint", "xl_inpaint", "sdxl", True, False),
    ("xl_refiner", "xl_refiner", "refiner", True, False),
    ("vae", "vae", None, None, False),
    ("unet_v1", "v1", "sd1", True, False),
    ("v1_ema", "v1", "sd1", True, True),
    ("v1_old_clip", "v1", "sd1", True, False),
]


@pytest.mark.parametrize("keys,name,family,standard,ema", TABLE, ids=[r[0] for r in TABLE])
def test_type_inference(key_sets, keys, name, family, standard, ema):
    sd = key_sets[keys]
    ftype = infer.detect(sd)
    assert (ftype.name, ftype.family, ftype.ema) == (name, family, ema)
    if standard is None:
        assert infer.vae_config(sd, None, "vae")["block_out_channels"] == [128, 256, 512, 512]
        return
    unet_sd = infer.strip(sd, ftype.unet_prefix) if ftype.unet_prefix else sd
    config, is_standard = infer.unet_config(unet_sd, family, name, infer.pooled_width(sd, ftype))
    assert is_standard == standard
    assert config == infer.standard_config(name)["unet"]
    for component, (layout, prefix) in ftype.text.items():
        text = infer.text_config(infer.strip(sd, prefix), layout, family, name, component)
        assert text == infer.standard_config(name)[component], component


def test_shapes_give_the_standard_config_too(key_sets):
    """The derivation from shapes alone agrees with the shipped configs on what shapes tell."""
    from runtime.models.single_file import unet_keys

    for name in ("v1", "v2", "xl_base", "xl_refiner"):
        derived = unet_keys.infer_config(infer.strip(key_sets[name], "model.diffusion_model."))
        standard = infer.standard_config(name)["unet"]
        assert infer._matches_standard(derived, standard), name


def test_shipped_tokenizer_is_clips():
    vocab, merges = infer.clip_vocabulary()
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    from runtime.models import CLIPTokenizer

    tok = CLIPTokenizer(vocab, merges)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids


# ---- bad input ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    folder = build_sd(root, "sd")
    file = ref.write(ref.pipeline_to_ldm(folder, {"text_encoder": ("clip", "cond_stage_model.transformer.", False)}),
                     root / "sd.safetensors")
    return folder, file


def test_unknown_layout(tmp_path):
    path = ref.write({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "foo.bar": torch.zeros(1)},
                     tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="closest") as info:
        runtime.StableDiffusionPipeline.from_single_file(str(path))
    assert "model.diffusion_model.out.2.weight" in str(info.value)  # a missing marker key, by name


def test_diffusers_layout_is_not_a_single_file(tmp_path):
    path = ref.write({"conv_in.weight": torch.zeros(1), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)},
                     tmp_path / "diffusers.safetensors")
    with pytest.raises(CheckpointError, match="no known single-file layout"):
        runtime.UNet2DConditionModel.from_single_file(str(path))


def test_truncated_file(sd_file, tmp_path):
    _, file = sd_file
    data = file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        runtime.StableDiffusionPipeline.from_single_file(str(cut))


class Payload:
    """An object weights_only refuses to unpickle."""


def test_unsafe_pickle(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}, "callbacks": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        runtime.StableDiffusionPipeline.from_single_file(str(path))


def test_shapes_contradict_config(sd_file, tmp_path):
    folder, file = sd_file
    bad = tmp_path / "bad_config"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError) as info:
        runtime.StableDiffusionPipeline.from_single_file(str(file), config=str(bad))
    text = str(info.value)
    assert "model.diffusion_model.input_blocks" in text and "attn2.to_k.weight" in text
    assert "[64, 48]" in text and "[64, 32]" in text


def test_wrong_pipeline_family(sd_file):
    _, file = sd_file
    with pytest.raises(ConfigError, match="StableDiffusionPipeline"):
        runtime.StableDiffusionXLPipeline.from_single_file(str(file))


def test_tiny_vocabulary_needs_a_tokenizer(sd_file):
    _, file = sd_file
    with pytest.raises(ConfigError, match="tokenizer="):
        runtime.StableDiffusionPipeline.from_single_file(str(file))


def test_offline_config_hub_id(sd_file, monkeypatch):
    _, file = sd_file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from runtime.models.errors import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError):
        runtime.StableDiffusionPipeline.from_single_file(str(file), config="someone/not-cached-anywhere",
                                                         local_files_only=True)
