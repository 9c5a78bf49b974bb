"""Tiny random-weight pipelines built and saved by diffusers once per session (CPU, fp32).

The builders mirror diffusers' own fast tests: UNet (32, 64) channels, a 2-layer CLIP with
hidden size 32 and a small byte-level BPE vocabulary written here, and a 2-block VAE (factor 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SEED = 0
PROMPT = "a red circle on a blue square"
TOL = 1e-4  # fp32 max-abs on latents and images, stated once


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("b", "l"), ("bl", "u"), ("blu", "e</w>"),
          ("o", "n</w>"), ("s", "q"), ("a", "r"), ("t", "h"), ("th", "e</w>")]


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write vocab.json / merges.txt / configs of a small CLIP BPE tokenizer; returns its size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in MERGES) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(str(folder))
    return len(vocab)


def _tokenizer(root: Path, name: str = "tok", pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    folder = root / f"_{name}"
    write_clip_tokenizer(folder, pad_token)
    return CLIPTokenizer.from_pretrained(str(folder))


def _text_encoder(tokenizer, projection: bool = False, seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), projection_dim=32, hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(seed: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=16,
    ).eval()


def _unet(in_channels: int = 4, seed: int = 3, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32,
    )
    kwargs.update(extra)
    return UNet2DConditionModel(**kwargs).eval()


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_sd(root: Path, name: str, unet_in_channels: int = 4, cls_name: str = "StableDiffusionPipeline") -> Path:
    import diffusers

    tokenizer = _tokenizer(root, name)
    pipe = getattr(diffusers, cls_name)(
        vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, unet=_unet(unet_in_channels),
        scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = root / name
    pipe.save_pretrained(str(folder))
    return folder


def build_sdxl(root: Path, name: str = "sdxl") -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = _tokenizer(root, name)
    tokenizer_2 = _tokenizer(root, name + "_2", pad_token="!")
    unet = _unet(
        seed=4, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, transformer_layers_per_block=(1, 2), use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, seed=5), text_encoder_2=_text_encoder(tokenizer_2, True, seed=6),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    folder = root / name
    pipe.save_pretrained(str(folder))
    return folder


def build_sdxl_refiner(root: Path, name: str = "sdxl_refiner") -> Path:
    """SDXL-refiner layout: one (projection) text encoder and aesthetic-score conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    tokenizer_2 = _tokenizer(root, name + "_2", pad_token="!")
    unet = _unet(
        seed=10, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=72,
        cross_attention_dim=32, use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=_text_encoder(tokenizer_2, True, seed=11), tokenizer=None,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
    )
    folder = root / name
    pipe.save_pretrained(str(folder))
    return folder


def build_ddpm(root: Path, name: str = "ddpm") -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(8)
    unet = UNet2DModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=3, out_channels=3,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    folder = root / name
    DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread on the shared test machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ddpm_folder(tmp_path_factory) -> Path:
    return build_ddpm(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("pipelines"), "sd")


@pytest.fixture(scope="session")
def sd_inpaint_folder(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("pipelines"), "sd_inpaint", 9, "StableDiffusionInpaintPipeline")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    return build_sdxl(tmp_path_factory.mktemp("pipelines"))


def quiet_pipeline(cls, folder):
    """``cls.from_pretrained(folder)`` with its progress bar off (what the optim tests run)."""
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_image(seed: int = 7, size: int = 16):
    """A deterministic RGB PIL image (and a half-white mask) of ``size`` pixels."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255
    return image, PIL.Image.fromarray(mask)


test_image.__test__ = False  # a builder, not a test


def pipeline_state(pipe) -> dict:
    """Every weight and buffer of the pipeline's models, cloned (to compare after a revert)."""
    from runtime.optim.components import pipeline_models

    return {f"{name}.{k}": v.clone() for name, m in pipeline_models(pipe).items() for k, v in m.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
