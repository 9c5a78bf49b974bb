"""Fixtures of the LoRA tests: random peft adapters on tiny SD-like and SDXL-like models (lora_cases.py)."""
import pytest

from lora_cases import LoraCase, make_case, tiny_text_encoder


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
