"""from_pretrained time of each component, ours against diffusers/transformers, on the same folder."""
from __future__ import annotations

import pytest

from .conftest import IMPLS, run


def _loader(impl: str, component: str):
    if impl == "ours":
        import runtime

        return {"unet": runtime.UNet2DConditionModel, "vae": runtime.AutoencoderKL,
                "text_encoder": runtime.CLIPTextModel}[component]
    import diffusers
    import transformers

    return {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
            "text_encoder": transformers.CLIPTextModel}[component]


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
@pytest.mark.parametrize("impl", IMPLS)
def test_model_load(benchmark, folder, rounds, impl, component):
    benchmark.group = f"from_pretrained {component}"
    cls = _loader(impl, component)
    model = run(benchmark, rounds, lambda: cls.from_pretrained(str(folder), subfolder=component))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_pipeline_load(benchmark, folder, rounds):
    """Whole pipeline, ours (diffusers' is in the parametrized group below)."""
    import runtime

    benchmark.group = "from_pretrained pipeline"
    run(benchmark, rounds, lambda: runtime.StableDiffusionPipeline.from_pretrained(str(folder)))


def test_pipeline_load_diffusers(benchmark, folder, rounds):
    import diffusers

    benchmark.group = "from_pretrained pipeline"
    run(benchmark, rounds, lambda: diffusers.StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False))
