"""LoRA files made with diffusers + peft (test references only), once per run.

Each file holds random, non-zero adapters (``init_lora_weights=False``) for the UNet, convolutions
included, and the text encoder(s), written by diffusers' ``save_lora_weights`` with the adapters'
``LoraConfig`` as metadata (so alpha != rank survives). transformers 5.25 asks for peft >= 0.22 before
it loads a text-encoder adapter; peft 0.21.2 (pinned) does the work fine, so the tests lift that
version check for diffusers' side.
"""
from __future__ import annotations

from pathlib import Path

import pytest

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


