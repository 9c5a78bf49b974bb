"""ModelMixin's documented API against diffusers 0.42.1: from_pretrained's loading options,
ignore_mismatched_sizes (SD -> inpainting UNet), loading info, device_map, save_pretrained /
push_to_hub arguments, xformers enable/disable, config_name / num_parameters / gradient
checkpointing, and config values that size tensors."""
from __future__ import annotations

import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from runtime.models import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from runtime.models.attention import sdpa_backend
from runtime.models.device_map import plan_sequential
from runtime.models.errors import (
    BackendUnavailableError,
    ConfigError,
    DependencyMissingError,
    InputError,
    ShapeMismatchError,
)
from tiny_configs import unet_config, unet_inputs
from toy_model import ToyModel, assert_state_equal, make_toy

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd_unet(tmp_path_factory):
    """A tiny SD-shaped UNet saved by diffusers itself (conv_in.weight: [16, 4, 3, 3])."""
    folder = tmp_path_factory.mktemp("sd") / "unet"
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**unet_config("sd1")).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _diffusers_verbosity_restored():
    """Tests here quiet diffusers' logger; later modules compare against its warnings."""
    before = diffusers.utils.logging.get_verbosity()
    yield
    diffusers.utils.logging.set_verbosity(before)


def _quiet_diffusers():
    diffusers.utils.logging.set_verbosity_error()


# ---- from_pretrained: loading options ---------------------------------------------------------
def test_hub_and_deprecated_options_are_accepted(sd_unet):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = UNet2DConditionModel.from_pretrained(
            sd_unet, force_download=False, resume_download=True, proxies=None, mirror=None,
            offload_state_dict=True, low_cpu_mem_usage=True)
    assert any("resume_download" in str(w.message) and issubclass(w.category, FutureWarning) for w in caught)
    ref = diffusers.UNet2DConditionModel.from_pretrained(sd_unet)
    assert_state_equal(ref, model)


def test_force_download_and_proxies_reach_huggingface_hub(monkeypatch, tmp_path, sd_unet):
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(sd_unet.parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        UNet2DConditionModel.from_pretrained("someone/sd", subfolder="unet", force_download=True,
                                             proxies={"https": "proxy:3128"})
    assert seen["repo_id"] == "someone/sd" and seen["force_download"] is True
    # huggingface_hub 2.x has no proxies argument: we say so (as it does), never pass it blindly
    assert "proxies" not in seen and any("HTTPS_PROXY" in str(w.message) for w in caught)


def test_output_loading_info_matches_diffusers(sd_unet, tmp_path):
    _quiet_diffusers()
    model, info = UNet2DConditionModel.from_pretrained(sd_unet, output_loading_info=True)
    _, ref_info = diffusers.UNet2DConditionModel.from_pretrained(sd_unet, output_loading_info=True)
    assert info == ref_info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert isinstance(model, UNet2DConditionModel)
    # an extra tensor in the checkpoint: both report it as unexpected
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((sd_unet / "config.json").read_text())
    tensors = load_file(str(sd_unet / "diffusion_pytorch_model.safetensors"))
    tensors["stray.weight"] = torch.zeros(2)
    save_file(tensors, str(extra / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    _, info = UNet2DConditionModel.from_pretrained(extra, output_loading_info=True)
    _, ref_info = diffusers.UNet2DConditionModel.from_pretrained(extra, output_loading_info=True)
    assert info == ref_info and info["unexpected_keys"] == ["stray.weight"]


def test_ignore_mismatched_sizes_turns_sd_into_inpainting(sd_unet, caplog):
    """diffusers' documented recipe: in_channels=9 over an SD checkpoint."""
    _quiet_diffusers()
    kwargs = dict(in_channels=9, ignore_mismatched_sizes=True, low_cpu_mem_usage=False, output_loading_info=True)
    with caplog.at_level(logging.WARNING):
        model, info = UNet2DConditionModel.from_pretrained(sd_unet, **kwargs)
    ref, ref_info = diffusers.UNet2DConditionModel.from_pretrained(sd_unet, **kwargs)
    assert info == ref_info
    assert info["mismatched_keys"] == [("conv_in.weight", torch.Size([16, 4, 3, 3]), torch.Size([16, 9, 3, 3]))]
    assert "conv_in.weight" in caplog.text and "[16, 4, 3, 3]" in caplog.text and "[16, 9, 3, 3]" in caplog.text
    assert "shapes did not match" in caplog.text
    assert model.config.in_channels == 9 and model.conv_in.weight.shape == (16, 9, 3, 3)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if key != "conv_in.weight":
            assert torch.equal(ours[key], theirs[key]), key
    assert torch.isfinite(model.conv_in.weight).all() and model.conv_in.weight.std() > 0  # initialised, not empty
    out = model(**unet_inputs(unet_config("inpaint"))).sample
    assert out.shape == (2, 4, 16, 16)
    # the default low_cpu_mem_usage=True works too (built with real tensors for the new weights)
    model2 = UNet2DConditionModel.from_pretrained(sd_unet, in_channels=9, ignore_mismatched_sizes=True)
    assert not any(p.is_meta for p in model2.parameters())


def test_mismatched_sizes_without_the_flag_name_key_and_shapes(sd_unet):
    with pytest.raises(ShapeMismatchError, match=r"conv_in\.weight.*\[16, 9, 3, 3\].*\[16, 4, 3, 3\].*ignore_mismatched"):
        UNet2DConditionModel.from_pretrained(sd_unet, in_channels=9)
    # diffusers fails too (a RuntimeError without accelerate, a ValueError with it: peft pulls it in)
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|expected shape"):
        diffusers.UNet2DConditionModel.from_pretrained(sd_unet, in_channels=9)


def test_unknown_keywords_are_ignored_like_diffusers(sd_unet, caplog):
    with caplog.at_level(logging.WARNING):
        model = UNet2DConditionModel.from_pretrained(sd_unet, not_an_option=3)
    assert "not_an_option" in caplog.text and "not_an_option" not in model.config
    with pytest.raises(InputError, match="quantization_config"):
        UNet2DConditionModel.from_pretrained(sd_unet, quantization_config={"load_in_8bit": True})


def test_disable_mmap_loads_the_same_weights(sd_unet):
    assert_state_equal(UNet2DConditionModel.from_pretrained(sd_unet),
                       UNet2DConditionModel.from_pretrained(sd_unet, disable_mmap=True))


# ---- device_map / max_memory ------------------------------------------------------------------
@pytest.mark.parametrize("device_map", ["cpu", "auto", "balanced", torch.device("cpu"), {"": "cpu"},
                                        {"conv_in": "cpu", "down_blocks.0": "disk", "": "cpu"}], ids=str)
def test_device_map_on_cpu(sd_unet, device_map, tmp_path):
    ref = UNet2DConditionModel.from_pretrained(sd_unet)
    model = UNet2DConditionModel.from_pretrained(sd_unet, device_map=device_map, max_memory={"cpu": "1GB"},
                                                 offload_folder=tmp_path / "offload")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert isinstance(model.hf_device_map, dict)
    assert_state_equal(ref, model)
    inputs = unet_inputs(unet_config("sd1"))
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref(**inputs).sample)


def test_bad_device_maps_are_clear(sd_unet):
    with pytest.raises(InputError, match="low_cpu_mem_usage"):
        UNet2DConditionModel.from_pretrained(sd_unet, device_map="cpu", low_cpu_mem_usage=False)
    with pytest.raises(InputError, match="no_such_block"):
        UNet2DConditionModel.from_pretrained(sd_unet, device_map={"no_such_block": "cpu"})
    with pytest.raises(InputError, match="potato"):
        UNet2DConditionModel.from_pretrained(sd_unet, device_map={"": "potato"})
    with pytest.raises(InputError, match="negative"):
        UNet2DConditionModel.from_pretrained(sd_unet, device_map=-1)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            UNet2DConditionModel.from_pretrained(sd_unet, device_map={"conv_in": "cuda:0", "": "cpu"})
    with pytest.raises(InputError, match="max_memory"):
        UNet2DConditionModel.from_pretrained(sd_unet, device_map="auto", max_memory={"cpu": "lots"})


def test_sequential_plan_fills_devices_in_order():
    sizes = [("a", 4), ("b", 4), ("c", 4), ("d", 4)]
    plan = plan_sequential(sizes, [("cuda:0", 8), ("cuda:1", 4), ("cpu", float("inf"))])
    assert plan == {"a": "cuda:0", "b": "cuda:0", "c": "cuda:1", "d": "cpu"}


def test_split_device_map_moves_inputs(sd_unet):
    """A module mapped to another device gets its inputs moved there (meta stands in for a GPU)."""
    from runtime.models.device_map import dispatch

    model = make_toy()
    used = dispatch(model, {"proj": torch.device("meta"), "": torch.device("cpu")})
    assert used == {"proj": "meta", "": "cpu"}
    assert model.proj.weight.is_meta and not model.embed.weight.is_meta
    out = model.proj(torch.randn(2, 8))  # a CPU input reaches the meta module on meta
    assert out.is_meta and out.shape == (2, 8)
    model = UNet2DConditionModel.from_pretrained(sd_unet, device_map={"conv_in": "cpu", "": "cpu"})
    assert model.hf_device_map == {"conv_in": "cpu", "": "cpu"}


# ---- save_pretrained / push_to_hub ------------------------------------------------------------
def test_save_pretrained_signature_matches_diffusers():
    import inspect

    ours = list(inspect.signature(UNet2DConditionModel.save_pretrained).parameters)
    theirs = list(inspect.signature(diffusers.UNet2DConditionModel.save_pretrained).parameters)
    assert ours[:7] == theirs[:7] == ["self", "save_directory", "is_main_process", "save_function",
                                     "safe_serialization", "variant", "max_shard_size"]
    ours = list(inspect.signature(UNet2DConditionModel.push_to_hub).parameters)
    theirs = list(inspect.signature(diffusers.UNet2DConditionModel.push_to_hub).parameters)
    assert ours[:len(theirs)] == theirs


def test_variant_save_loads_in_diffusers(tmp_path, sd_unet):
    model = UNet2DConditionModel.from_pretrained(sd_unet).half()
    model.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float16)
    assert_state_equal(model, ref)


def test_save_function_writes_pickles_and_diffusers_reads_them(tmp_path):
    calls = []

    def save_function(obj, path):
        calls.append(Path(path).name)
        torch.save(obj, path)

    model = make_toy()
    model.save_pretrained(tmp_path / "p", save_function=save_function, safe_serialization=False)
    assert calls == ["diffusion_pytorch_model.bin"]
    assert_state_equal(model, ToyModel.from_pretrained(tmp_path / "p"))
    # positional order as in diffusers: (save_directory, is_main_process, save_function, safe_serialization)
    model.save_pretrained(tmp_path / "q", True, save_function, False)
    assert calls[-1] == "diffusion_pytorch_model.bin"
    assert model.save_pretrained(tmp_path / "none", False) is None and not (tmp_path / "none").exists()


def test_push_to_hub_through_hfapi(monkeypatch):
    import huggingface_hub

    seen = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        seen["repo"] = (repo_id, private, exist_ok, self.token)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, create_pr=None, **kw):
        seen["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), path_in_repo,
                          commit_message, create_pr)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = make_toy().push_to_hub("me/toy", None, True, "hf_tok", False, True, "ema", subfolder="unet")
    assert out == "commit-info"
    assert seen == {"repo": ("me/toy", True, True, "hf_tok"),
                    "upload": ("me/toy", ["config.json", "diffusion_pytorch_model.ema.safetensors"], "unet",
                               "Upload model", False)}


# ---- xformers ---------------------------------------------------------------------------------
def test_xformers_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    model = make_toy()
    with pytest.raises(DependencyMissingError, match="xformers is not installed") as info:
        model.enable_xformers_memory_efficient_attention()
    assert isinstance(info.value, ModuleNotFoundError)
    model.disable_xformers_memory_efficient_attention()  # works anywhere, as in diffusers


def _fake_xformers(monkeypatch, calls):
    """An ``xformers.ops`` whose kernel is SDPA on (B, T, H, D) tensors (the layout xformers takes)."""
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
        calls.append(op)
        assert q.ndim == 3 or q.shape[2] == k.shape[2]  # (B, T, H, D): heads in dim 2
        if q.ndim == 3:
            return q
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_bias)
        return out.transpose(1, 2)

    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    pkg.__spec__ = types.SimpleNamespace(name="xformers")
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_without_cuda_is_a_clear_error(monkeypatch):
    _fake_xformers(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="CUDA") as info:
        make_toy().enable_xformers_memory_efficient_attention()
    assert isinstance(info.value, ValueError)


def test_xformers_backend_runs_through_the_slot(monkeypatch, sd_unet):
    calls = []
    _fake_xformers(monkeypatch, calls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: real_randn(*a, **k))  # the trial call
    model = UNet2DConditionModel.from_pretrained(sd_unet)
    inputs = unet_inputs(unet_config("sd1"))
    with torch.no_grad():
        expected = model(**inputs).sample
    custom = object()
    model.enable_xformers_memory_efficient_attention(attention_op=custom)
    assert all(getattr(m.backend, "is_xformers", False) for m in model.attention_modules())
    calls.clear()
    with torch.no_grad():
        got = model(**inputs).sample
    assert calls and set(calls) == {custom}
    torch.testing.assert_close(got, expected)
    model.disable_xformers_memory_efficient_attention()
    assert all(m.backend is sdpa_backend for m in model.attention_modules())


def test_xformers_backend_masks(monkeypatch):
    from runtime.models.attention import xformers_backend

    _fake_xformers(monkeypatch, [])
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(xformers_backend()(q, k, v, mask), sdpa_backend(q, k, v, mask))


def test_disable_restores_the_previous_backend(monkeypatch):
    _fake_xformers(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: real_randn(*a, **k))
    model = UNet2DConditionModel.from_config(unet_config("sd1"))

    def mine(q, k, v, mask=None):
        return sdpa_backend(q, k, v, mask)

    model.set_attention_backend(mine)
    model.enable_xformers_memory_efficient_attention()
    model.enable_xformers_memory_efficient_attention()  # twice: still restores ``mine``
    model.disable_xformers_memory_efficient_attention()
    assert all(m.backend is mine for m in model.attention_modules())


# ---- config_name, num_parameters, gradient checkpointing --------------------------------------
def test_config_name_and_num_parameters_match_diffusers():
    assert UNet2DConditionModel.config_name == diffusers.UNet2DConditionModel.config_name == "config.json"
    config = unet_config("sd1")
    ref, ours = diffusers.UNet2DConditionModel(**config), UNet2DConditionModel.from_config(config)
    for kwargs in ({}, {"only_trainable": True}, {"exclude_embeddings": True}):
        assert ours.num_parameters(**kwargs) == ref.num_parameters(**kwargs), kwargs
    ours.conv_in.requires_grad_(False)
    ref.conv_in.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == ref.num_parameters(only_trainable=True)


def test_gradient_checkpointing_toggles_and_keeps_gradients():
    config = unet_config("sd1")
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(config).train()
    inputs = unet_inputs(config, batch=1)
    assert not model.is_gradient_checkpointing
    model(**inputs).sample.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    model(**inputs).sample.square().mean().backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


# ---- config values that size tensors ----------------------------------------------------------
@pytest.mark.parametrize("cls,config,key,value", [
    (UNet2DConditionModel, unet_config("sd1"), "block_out_channels", [-4, 8, 8]),
    (UNet2DConditionModel, unet_config("sd1"), "layers_per_block", 0),
    (UNet2DConditionModel, unet_config("sd1"), "cross_attention_dim", -24),
    (UNet2DConditionModel, unet_config("sd1"), "attention_head_dim", [2, 0, 2]),
    (UNet2DConditionModel, unet_config("sd1"), "in_channels", 2.5),
    (UNet2DConditionModel, unet_config("sd1"), "norm_num_groups", 0),
    (UNet2DConditionModel, unet_config("sd1"), "transformer_layers_per_block", [1, -1, 1]),
    (UNet2DModel, dict(block_out_channels=[-4, 8], down_block_types=["DownBlock2D"] * 2,
                       up_block_types=["UpBlock2D"] * 2, norm_num_groups=4), "block_out_channels", [-4, 8]),
    (UNet2DModel, dict(block_out_channels=[8, 8], down_block_types=["DownBlock2D"] * 2,
                       up_block_types=["UpBlock2D"] * 2, norm_num_groups=4), "layers_per_block", -1),
    (AutoencoderKL, dict(block_out_channels=[-4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4), "block_out_channels", [-4, 8]),
    (AutoencoderKL, dict(block_out_channels=[8], norm_num_groups=4), "latent_channels", 0),
])
def test_sizing_config_values_are_checked(cls, config, key, value):
    config = {**config, key: value}
    with pytest.raises(ConfigError, match=key) as info:
        cls.from_config(config)
    assert str(value if not isinstance(value, list) else value[1 if value[0] > 0 else 0]) in str(info.value)


@pytest.mark.parametrize("cls,config", [
    (UNet2DConditionModel, unet_config("sd1", block_out_channels=[16, 30, 32])),
    (UNet2DModel, dict(block_out_channels=[8, 12], down_block_types=["DownBlock2D"] * 2,
                       up_block_types=["UpBlock2D"] * 2, norm_num_groups=8)),
    (AutoencoderKL, dict(block_out_channels=[8, 12], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8)),
])
def test_norm_groups_must_divide_channels(cls, config):
    with pytest.raises(ConfigError, match="norm_num_groups.*does not divide"):
        cls.from_config(config)


def test_negative_channels_in_a_config_file_name_the_file(tmp_path, sd_unet):
    import json

    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((sd_unet / "config.json").read_text())
    config["block_out_channels"] = [-4, 8, 8]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (sd_unet / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"config\.json.*block_out_channels.*-4"):
        UNet2DConditionModel.from_pretrained(folder)
