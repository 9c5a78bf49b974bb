"""LoRA files made with diffusers + peft (test references only), once per run; and random peft
adapters on tiny SD-like and SDXL-like models for the format tests (lora_cases.py).

Each file holds random, non-zero adapters (``init_lora_weights=False``) for the UNet, convolutions
included, and the text encoder(s), written by diffusers' ``save_lora_weights`` with the adapters'
``LoraConfig`` as metadata (so alpha != rank survives). transformers 5.25 asks for peft >= 0.22 before
it loads a text-encoder adapter; peft 0.21.2 (pinned) does the work fine, so the tests lift that
version check for diffusers' side.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_cases import LoraCase, make_case, tiny_text_encoder
from lora_helpers import make_lora


@pytest.fixture(scope="session", autouse=True)
def _transformers_takes_peft_0_21():
    import transformers.integrations.peft as tpeft

    saved = tpeft.check_peft_version
    tpeft.check_peft_version = lambda min_version: None
    yield
    tpeft.check_peft_version = saved


@pytest.fixture(scope="session")
def sd_lora(sd_folder, tmp_path_factory) -> Path:
    """rank 4, alpha 8 (scale 2): every UNet target incl. convolutions, every CLIP projection."""
    return make_lora(sd_folder, tmp_path_factory.mktemp("lora") / "sd_a", seed=0, r=4, alpha=8)


@pytest.fixture(scope="session")
def sd_lora_b(sd_folder, tmp_path_factory) -> Path:
    """rank 8, alpha 4: attention projections and resnet conv1 only, q/v of CLIP."""
    return make_lora(sd_folder, tmp_path_factory.mktemp("lora") / "sd_b", seed=1, r=8, alpha=4,
                     unet_targets=["to_q", "to_k", "to_v", "to_out.0", "conv1"], te_targets=["q_proj", "v_proj"])


@pytest.fixture(scope="session")
def sdxl_lora(sdxl_folder, tmp_path_factory) -> Path:
    return make_lora(sdxl_folder, tmp_path_factory.mktemp("lora") / "sdxl", seed=2, r=4, alpha=4, te2=True)


@pytest.fixture(scope="session")
def sd_case() -> LoraCase:
    from diffusers import StableDiffusionPipeline
    from pipeline_fixtures import _unet

    return make_case(StableDiffusionPipeline, {"unet": _unet(), "text_encoder": tiny_text_encoder(False, 1)}, seed=10)


@pytest.fixture(scope="session")
def sdxl_case() -> LoraCase:
    from diffusers import StableDiffusionXLPipeline
    from pipeline_fixtures import _unet

    unet = _unet(seed=4, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=80, cross_attention_dim=64, transformer_layers_per_block=(1, 2),
                 use_linear_projection=True)
    base = {"unet": unet, "text_encoder": tiny_text_encoder(False, 5), "text_encoder_2": tiny_text_encoder(True, 6)}
    return make_case(StableDiffusionXLPipeline, base, seed=20)
