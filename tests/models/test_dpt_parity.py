"""DPTForDepthEstimation and DPTImageProcessor against transformers on random tiny configs.

The hybrid config is the one diffusers' depth-to-image fast tests use (ViT + BiT backbone, 32 px).
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from runtime.models.dpt import DPTForDepthEstimation
from runtime.models.dpt_image_processor import DPTImageProcessor
from runtime.models.errors import ConfigError, InputError

REL = 1e-5  # fp32 max-abs relative to the reference's largest value

# diffusers' tests/pipelines/stable_diffusion_2/test_stable_diffusion_depth.py
HYBRID_BACKBONE = {"global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
                   "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                   "hidden_sizes": [96, 192, 384, 768], "num_groups": 2}
HYBRID = dict(image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=4,
              backbone_out_indices=(0, 1, 2, 3), num_attention_heads=4, intermediate_size=37, hidden_act="gelu",
              is_hybrid=True, backbone_config=HYBRID_BACKBONE, backbone_featmap_shape=[1, 384, 24, 24])
# Pre-activation BiT without "same" padding, BatchNorm in the fusion units, the head's projection.
PREACT = dict(HYBRID, backbone_config=dict(HYBRID_BACKBONE, layer_type="preactivation", global_padding=None,
                                           embedding_dynamic_padding=False, depths=[1, 2, 2],
                                           hidden_sizes=[96, 192, 384]),
              use_batch_norm_in_fusion_residual=True, add_projection=True)
PLAIN = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, backbone_out_indices=(0, 1, 2, 3),
             num_attention_heads=4, intermediate_size=37, neck_hidden_sizes=(16, 32, 64, 64), fusion_hidden_size=32)
CASES = {
    "hybrid": HYBRID,
    "hybrid_preact_batchnorm": PREACT,
    "vit_project": dict(PLAIN, readout_type="project"),
    "vit_add": dict(PLAIN, readout_type="add"),
    "vit_ignore": dict(PLAIN, readout_type="ignore", qkv_bias=False),
}


def reference(name: str, seed: int = 0):
    from transformers import DPTConfig
    from transformers import DPTForDepthEstimation as Ref

    torch.manual_seed(seed)
    model = Ref(DPTConfig(**CASES[name])).eval()
    with torch.no_grad():  # random (not identity) BatchNorm statistics and zero-init tokens
        for key, value in model.state_dict().items():
            if "running_var" in key:
                value.uniform_(0.5, 2.0)
            elif "running_mean" in key or key.endswith(("cls_token", "position_embeddings")):
                value.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpt")
    cache = {}

    def get(name):
        if name not in cache:
            model = reference(name)
            model.save_pretrained(str(root / name))
            cache[name] = model, root / name
        return cache[name]

    return get


def pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = REL) -> None:
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= rel * max(1e-3, theirs.abs().max().item()), err


@pytest.mark.parametrize("name", list(CASES))
def test_depth_matches_transformers(saved, name):
    ref, folder = saved(name)
    ours = DPTForDepthEstimation.from_pretrained(str(folder))
    x = pixels()
    with torch.no_grad():
        expected = ref(x).predicted_depth
        out = ours(x)
    assert out.predicted_depth.shape == expected.shape == (2,) + tuple(expected.shape[1:])
    assert_close(out.predicted_depth, expected)
    assert torch.equal(ours(x, return_dict=False)[0], out.predicted_depth)


def test_saved_model_loads_in_transformers(saved, tmp_path):
    from transformers import DPTForDepthEstimation as Ref

    ref, folder = saved("hybrid")
    ours = DPTForDepthEstimation.from_pretrained(str(folder))
    ours.save_pretrained(tmp_path / "ours")
    again = Ref.from_pretrained(str(tmp_path / "ours")).eval()
    x = pixels(1)
    with torch.no_grad():
        assert_close(again(x).predicted_depth, ref(x).predicted_depth)
    assert DPTForDepthEstimation.from_pretrained(str(tmp_path / "ours")).config.backbone_config["num_groups"] == 2


def test_fused_qkv_and_backend_slot_keep_the_output(saved):
    from runtime.models.attention import sdpa_backend

    ref, folder = saved("hybrid")
    ours = DPTForDepthEstimation.from_pretrained(str(folder))
    x = pixels(1)
    with torch.no_grad():
        before = ours(x).predicted_depth
        assert len(ours.attention_modules()) == 4
        ours.fuse_qkv_projections()
        ours.set_attention_backend(lambda q, k, v, m: sdpa_backend(q, k, v, m))
        after = ours(x).predicted_depth
    assert_close(after, before)
    assert not any(".to_qkv." in k for k in ours._state_dict_for_save())


def test_input_and_config_errors(saved):
    _, folder = saved("hybrid")
    ours = DPTForDepthEstimation.from_pretrained(str(folder))
    with pytest.raises(InputError, match="image_size"):
        ours(pixels(1, size=64))
    with pytest.raises(InputError, match="channels"):
        ours(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ConfigError, match="backbone"):
        DPTForDepthEstimation(**dict(PLAIN, backbone_config={"model_type": "dinov2"}))
    with pytest.raises(ConfigError, match="readout_type"):
        DPTForDepthEstimation(**dict(HYBRID, readout_type="add"))


# ---- the image processor ------------------------------------------------------------------
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)),
            rng.integers(0, 256, (30, 20, 3), dtype=np.uint8),
            rng.random((3, 40, 50)).astype(np.float32),
            torch.rand(3, 24, 36, generator=torch.Generator().manual_seed(1))]


PROCESSORS = [
    dict(size={"height": 32, "width": 32}),
    dict(size={"height": 384, "width": 384}, keep_aspect_ratio=True, ensure_multiple_of=32),
    dict(size={"height": 64, "width": 48}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=True, size_divisor=32,
         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
]


@pytest.mark.parametrize("settings", PROCESSORS, ids=["square", "aspect32", "aspect14_pad"])
def test_image_processor_matches_transformers(settings):
    import transformers

    ref = transformers.DPTImageProcessor(**settings)
    ours = DPTImageProcessor(**settings)
    for image in images():
        expected = ref(images=image, return_tensors="pt").pixel_values
        got = ours(images=image, return_tensors="pt").pixel_values
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got, expected)
    batch = [images()[0]] * 2
    assert torch.equal(ours(batch).pixel_values, ref(images=batch, return_tensors="pt").pixel_values)


def test_image_processor_files_round_trip(tmp_path):
    import transformers

    transformers.DPTImageProcessor(**PROCESSORS[1]).save_pretrained(str(tmp_path / "theirs"))
    ours = DPTImageProcessor.from_pretrained(tmp_path / "theirs")
    assert ours.keep_aspect_ratio and ours.ensure_multiple_of == 32
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.DPTImageProcessor.from_pretrained(str(tmp_path / "ours"))
    image = images()[0]
    assert torch.equal(again(images=image, return_tensors="pt").pixel_values, ours(image).pixel_values)
    with pytest.raises(InputError, match="lie in"):
        ours(np.full((3, 8, 8), -0.5, dtype=np.float32))
