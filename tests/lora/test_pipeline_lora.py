"""diffusers' LoRA API on our pipelines, against diffusers + peft on the same files (fp32 latents)."""
from __future__ import annotations

import threading

import pytest
import torch

import runtime
from lora_helpers import close, latents, lora_file, ours, reference
from pipeline_fixtures import assert_same_state, pipeline_state
from runtime.lora import get_peft_model_state_dict


def test_sd_parity_ten_steps(sd_folder, sd_lora):
    ref, pipe = reference(sd_folder), ours(sd_folder)
    base = latents(pipe, steps=10)
    ref.load_lora_weights(str(sd_lora), adapter_name="a")
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    expected, got = latents(ref, steps=10), latents(pipe, steps=10)
    close(got, expected)
    assert float((got - base).abs().max()) > 0.05  # the adapter does something
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["a"]
    assert pipe.get_list_adapters() == ref.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}


def test_sdxl_parity_both_text_encoders(sdxl_folder, sdxl_lora):
    ref, pipe = reference(sdxl_folder, "StableDiffusionXLPipeline"), ours(sdxl_folder, "StableDiffusionXLPipeline")
    ref.load_lora_weights(lora_file(sdxl_lora))  # a file path, default adapter name
    pipe.load_lora_weights(lora_file(sdxl_lora))
    assert pipe.get_list_adapters() == ref.get_list_adapters() == {
        "unet": ["default_0"], "text_encoder": ["default_0"], "text_encoder_2": ["default_0"]}
    close(latents(pipe, steps=10), latents(ref, steps=10))
    # the call-time scale reaches the UNet and both text encoders
    close(latents(pipe, cross_attention_kwargs={"scale": 0.5}), latents(ref, cross_attention_kwargs={"scale": 0.5}))


@pytest.fixture(scope="module")
def two(sd_folder, sd_lora, sd_lora_b):
    """diffusers' and our SD pipeline, each with adapters "a" (rank 4) and "b" (rank 8, fewer layers)."""
    ref, pipe = reference(sd_folder), ours(sd_folder)
    for p in (ref, pipe):
        p.load_lora_weights(str(sd_lora), adapter_name="a")
        p.load_lora_weights(str(sd_lora_b), adapter_name="b")
    return ref, pipe


def test_last_loaded_adapter_is_active(two):
    ref, pipe = two
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["b"]
    close(latents(pipe), latents(ref))


@pytest.mark.parametrize("weights", [[0.7, 0.3], 0.6, None], ids=["0.7/0.3", "one number", "None"])
def test_two_adapters_weighted(two, weights):
    ref, pipe = two
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], weights)
    assert close(latents(pipe), latents(ref)) <= 1e-4  # fp32 latents, max-abs


def test_per_block_and_per_component_weights(sd_folder, sd_lora_b, caplog):
    # only adapter "b" here: with per-block weights, diffusers fails (IndexError) as soon as any adapter
    # adapts a layer near the root (conv_in, conv_out: "a" does); ours gives those 1.0 (test_adapters.py)
    ref, pipe = reference(sd_folder), ours(sd_folder)
    for p in (ref, pipe):
        p.load_lora_weights(str(sd_lora_b), adapter_name="b")
        p.load_lora_weights(str(sd_lora_b), adapter_name="b2")
    weights = {"unet": {"down": 0.9, "mid": 1.0, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1.0]}},
               "text_encoder": 0.5}
    for p in (ref, pipe):
        p.set_adapters("b", weights)
    close(latents(pipe), latents(ref))
    assert "block_1 ignored" in caplog.text  # the tiny UNet's up block 1 holds no attentions: diffusers drops it
    for p in (ref, pipe):
        p.set_adapters(["b", "b2"], [{"unet": {"up": {"block_0": [0.2, 0.5, 0.9]}, "down": {"block_1": [1.0, 0.1]}},
                                      "text_encoder": 0.0}, {"unet": {"mid": 0.3}}])
    close(latents(pipe), latents(ref))
    for p in (ref, pipe):  # one dict for two names: diffusers' copy serves the first only (it pops)
        p.set_adapters(["b", "b2"], {"unet": {"down": 0.2}, "text_encoder": 0.7})
    close(latents(pipe), latents(ref))


def test_call_time_scale(two):
    ref, pipe = two
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], [1.0, 0.5])
    # 0.0 last: after a call with scale 0, diffusers resets every active adapter's weight to 1.0 (its
    # unscale_lora_layers cannot divide by 0); ours never touches the stored weights
    for scale in (0.5, 1.5, 0.0):
        close(latents(pipe, cross_attention_kwargs={"scale": scale}),
              latents(ref, cross_attention_kwargs={"scale": scale}))
    assert pipe.lora_scale == 0.0  # as diffusers' property: the last call's scale (ours: on this thread)
    pipe.disable_lora()
    without = latents(pipe)
    pipe.enable_lora()
    assert torch.equal(latents(pipe, cross_attention_kwargs={"scale": 0.0}), without)


def test_call_time_scale_is_per_thread(two):
    _, pipe = two
    pipe.set_adapters("a")
    expected = {s: latents(pipe, steps=2, cross_attention_kwargs={"scale": s}) for s in (0.3, 1.2)}
    got, barrier = {}, threading.Barrier(2)

    def run(s):
        barrier.wait()
        got[s] = latents(pipe, steps=2, cross_attention_kwargs={"scale": s})

    threads = [threading.Thread(target=run, args=(s,)) for s in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in expected:
        assert torch.equal(got[s], expected[s]), s


def test_disable_enable_and_fuse_with_diffusers(two):
    ref, pipe = two
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], [0.7, 0.3])
        p.disable_lora()
    close(latents(pipe), latents(ref))
    for p in (ref, pipe):
        p.enable_lora()
        p.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.8)
    assert pipe.fused_loras == ref.fused_loras == {"a", "b"}
    close(latents(pipe), latents(ref))
    for p in (ref, pipe):
        p.unfuse_lora(components=["unet", "text_encoder"])
    close(latents(pipe), latents(ref), tol=2e-4)  # diffusers subtracts the delta again: it drifts a little
    assert pipe.num_fused_loras == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_unfuse_bit_exact(sd_folder, sd_lora, sd_lora_b, dtype):
    pipe = ours(sd_folder).to(dtype=dtype)
    before = pipeline_state(pipe)
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    pipe.load_lora_weights(str(sd_lora_b), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 0.3])
    unfused = latents(pipe, steps=2)
    for cycle in range(3):
        pipe.fuse_lora(lora_scale=1.0)
        if cycle == 0:
            fused = latents(pipe, steps=2)
            assert not torch.equal(fused, latents(ours(sd_folder).to(dtype=dtype), steps=2))
            close(fused, unfused, tol=1e-3 if dtype == torch.float32 else 0.5)
        pipe.unfuse_lora()
        assert_same_state(before, pipeline_state(pipe))
    assert torch.equal(latents(pipe, steps=2), unfused)
    pipe.fuse_lora(adapter_names=["b"])  # one adapter of two; then the other on top
    pipe.fuse_lora(adapter_names=["a"])
    pipe.unfuse_lora()
    assert_same_state(before, pipeline_state(pipe))


def test_delete_and_unload_give_the_base_back(sd_folder, sd_lora, sd_lora_b):
    fresh = latents(ours(sd_folder), steps=2)
    pipe = ours(sd_folder)
    before = pipeline_state(pipe)
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    pipe.load_lora_weights(str(sd_lora_b), adapter_name="b")
    pipe.set_adapters(["a", "b"])
    pipe.fuse_lora(adapter_names=["a"])
    pipe.delete_adapters("a")  # a fused adapter leaves the weights
    assert pipe.get_list_adapters() == {"unet": ["b"], "text_encoder": ["b"]}
    assert pipe.get_active_adapters() == ["b"]
    pipe.delete_adapters(["b"])
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    assert torch.equal(latents(pipe, steps=2), fresh)
    assert_same_state(before, pipeline_state(pipe))
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    pipe.fuse_lora()
    pipe.load_lora_weights(str(sd_lora_b), adapter_name="b")
    pipe.unload_lora_weights()
    assert torch.equal(latents(pipe, steps=2), fresh)
    assert_same_state(before, pipeline_state(pipe))
    for model in (pipe.unet, pipe.text_encoder):  # no chain entry, no state left behind
        assert "_lora_state" not in model.__dict__
        assert not any(getattr(m, "compute", ()) for m in model.modules())


def test_our_saved_file_loads_in_diffusers(two, tmp_path):
    ref, pipe = two
    pipe.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet, "b"),
                           text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, "b"))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary file was renamed
    pipe.set_adapters("b")
    expected = latents(pipe)
    fresh = reference(pipe.name_or_path)
    fresh.load_lora_weights(str(tmp_path), adapter_name="saved")  # alpha 4 / rank 8 comes back from the metadata
    close(latents(fresh), expected)
    again = ours(pipe.name_or_path)
    again.load_lora_weights(str(tmp_path))
    close(latents(again), expected, tol=0.0)


def test_lora_state_dict_and_dict_input_not_mutated(sd_folder, sd_lora):
    state_dict, alphas = runtime.StableDiffusionPipeline.lora_state_dict(str(sd_lora))
    assert alphas is None and all(k.startswith(("unet.", "text_encoder.")) for k in state_dict)
    _, _, metadata = runtime.StableDiffusionPipeline.lora_state_dict(str(sd_lora), return_lora_metadata=True)
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
    copy = {k: v.clone() for k, v in state_dict.items()}
    keys = list(state_dict)
    pipe = ours(sd_folder)
    pipe.load_lora_weights(state_dict, adapter_name="x")  # no metadata in a dict: alpha = rank, as diffusers
    assert list(state_dict) == keys and all(torch.equal(state_dict[k], copy[k]) for k in keys)
    ref = reference(sd_folder)
    ref.load_lora_weights(dict(state_dict), adapter_name="x")
    close(latents(pipe), latents(ref))


@pytest.mark.parametrize("task", ["img2img", "inpaint", "auto"])
def test_task_pipelines(sd_folder, sd_inpaint_folder, sd_lora, task):
    from pipeline_fixtures import test_image

    image, mask = test_image()
    if task == "auto":
        pipe = runtime.AutoPipelineForText2Image.from_pretrained(str(sd_folder))
        pipe.set_progress_bar_config(disable=True)
        ref = reference(sd_folder)
        kwargs = {}
    elif task == "img2img":
        pipe, ref = ours(sd_folder, "StableDiffusionImg2ImgPipeline"), reference(sd_folder, "StableDiffusionImg2ImgPipeline")
        kwargs = {"image": image, "strength": 0.7}
    else:
        pipe = ours(sd_inpaint_folder, "StableDiffusionInpaintPipeline")
        ref = reference(sd_inpaint_folder, "StableDiffusionInpaintPipeline")
        kwargs = {"image": image, "mask_image": mask}
        from lora_helpers import make_lora

        sd_lora = make_lora(sd_inpaint_folder, sd_lora.parent / "inpaint", seed=3, r=4, alpha=8)
    for p in (pipe, ref):
        p.load_lora_weights(str(sd_lora), adapter_name="a")
    assert close(latents(pipe, cross_attention_kwargs={"scale": 0.7}, **kwargs),
                 latents(ref, cross_attention_kwargs={"scale": 0.7}, **kwargs)) <= 1e-4  # fp32 latents, max-abs


def test_depth2img_has_the_api():
    assert hasattr(runtime.StableDiffusionDepth2ImgPipeline, "load_lora_weights")
    assert hasattr(runtime.StableDiffusionXLImg2ImgPipeline, "fuse_lora")
    assert runtime.StableDiffusionXLInpaintPipeline.component_names.count("text_encoder_2") == 1


def test_hub_id_through_the_cache(sd_folder, sd_lora, tmp_path, monkeypatch):
    """A hub id resolved through huggingface_hub's cache layout, offline (no network in tests)."""
    import hashlib
    import os

    import huggingface_hub
    from huggingface_hub.file_download import repo_folder_name

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / repo_folder_name(repo_id="lora-org/tiny-lora", repo_type="model")
    commit = "c" * 40
    data = lora_file(sd_lora).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / "my_lora.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe, direct = ours(sd_folder), ours(sd_folder)
    pipe.load_lora_weights("lora-org/tiny-lora", weight_name="my_lora.safetensors", cache_dir=str(tmp_path))
    direct.load_lora_weights(str(sd_lora))
    assert torch.equal(latents(pipe, steps=2), latents(direct, steps=2))
    other = ours(sd_folder)
    other.load_lora_weights("lora-org/tiny-lora", cache_dir=str(tmp_path))  # the one .safetensors file there
    assert torch.equal(latents(other, steps=2), latents(direct, steps=2))
    with pytest.raises(FileNotFoundError):
        ours(sd_folder).load_lora_weights("lora-org/missing", cache_dir=str(tmp_path))


def test_mixed_alphas_survive_our_save(sd_folder, sd_lora, tmp_path):
    """Per-layer alphas (network_alphas on a dict) are written as lora_alpha + alpha_pattern; diffusers reads them."""
    state_dict, _ = runtime.StableDiffusionPipeline.lora_state_dict(str(sd_lora))
    odd = [k[: -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight")][::3]
    pipe = ours(sd_folder)
    pipe.load_lora_weights(state_dict, adapter_name="m", network_alphas={f"{k}.alpha": 1.0 for k in odd})
    meta = get_peft_model_state_dict(pipe.unet, "m").lora_metadata
    assert meta["lora_alpha"] == 4.0 and set(meta["alpha_pattern"].values()) == {1.0}
    expected = latents(pipe)
    pipe.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                           text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    ref = reference(sd_folder)
    ref.load_lora_weights(str(tmp_path))
    close(latents(ref), expected)
    pipe.unet.save_lora_adapter(tmp_path / "unet_only")  # the model-level file: no prefix, a flat config
    unet = runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    unet.load_lora_adapter(str(tmp_path / "unet_only"), prefix=None, adapter_name="m")
    probe = pipe.unet.down_blocks[0].resnets[0].conv1
    x = torch.randn(1, probe.in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(unet.down_blocks[0].resnets[0].conv1(x), probe(x))
