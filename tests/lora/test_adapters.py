"""The LoRA mechanism at the model level: the chain entry, fused projections, hotswap, compile, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import runtime
from runtime.errors import LoraError
from runtime.lora.state import lora_state
from runtime.optim.undo import entry as chain_entry

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
PATHS = [f"{ATTN}.to_q", f"{ATTN}.to_k", f"{ATTN}.to_v", "down_blocks.0.resnets.0.conv1",
         "down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.0.conv_shortcut",
         "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"]


def random_lora(model, paths, rank: int, seed: int, prefix: str | None = "unet", scale: float = 0.3) -> dict:
    """A PEFT-format state dict with random adapters for ``paths`` of ``model``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, torch.nn.Conv2d):
            a = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=g)
            b = torch.randn(layer.out_channels, rank, 1, 1, generator=g)
        else:
            a = torch.randn(rank, layer.in_features, generator=g)
            b = torch.randn(layer.out_features, rank, generator=g)
        key = f"{prefix}.{path}" if prefix else path
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a * scale, b * scale
    return out


@pytest.fixture
def unet(sd_folder):
    return runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")


@pytest.fixture
def text_encoder(sd_folder):
    return runtime.CLIPTextModel.from_pretrained(str(sd_folder), subfolder="text_encoder")


def _input(layer, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=g).to(dtype)
    return torch.randn(2, 6, layer.in_features, generator=g).to(dtype)


def test_one_batched_pair_equals_the_sum_over_adapters(unet):
    a, b = random_lora(unet, PATHS, 4, 0), random_lora(unet, PATHS[:4], 8, 1)
    base = {p: unet.get_submodule(p) for p in PATHS}
    x = {p: _input(layer) for p, layer in base.items()}
    with torch.no_grad():
        plain = {p: layer(x[p]) for p, layer in base.items()}
    assert unet.load_lora_adapter(a, adapter_name="a") == "a"
    unet.load_lora_adapter(b, adapter_name="b", network_alphas={f"unet.{p}.alpha": 2.0 for p in PATHS})
    unet.set_adapters(["a", "b"], [0.7, 0.3])
    for p, layer in base.items():
        assert chain_entry(layer, "lora") is not None and not layer.computes_operator()
        with torch.no_grad():
            expected = plain[p]
            for name, sd, weight, scale in (("a", a, 0.7, 1.0), ("b", b, 0.3, 2.0 / 8)):
                if f"unet.{p}.lora_A.weight" not in sd:
                    continue
                down, up = sd[f"unet.{p}.lora_A.weight"], sd[f"unet.{p}.lora_B.weight"]
                if down.ndim == 4:
                    h = F.conv2d(x[p], down, None, layer.stride, layer.padding, layer.dilation)
                    expected = expected + F.conv2d(h, up) * (weight * scale)
                else:
                    expected = expected + F.linear(F.linear(x[p], down), up) * (weight * scale)
            got = layer(x[p])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            residual = torch.randn_like(got)
            assert torch.equal(layer(x[p], residual), residual + got)  # add comes last: add + (base + delta)
    entry = chain_entry(base[PATHS[0]], "lora")
    down, up = entry.packs[(torch.float32, torch.device("cpu"))]
    assert down.shape[0] == up.shape[1] == 12  # one pair of matmuls: ranks 4 + 8 concatenated


def test_adapters_cast_to_the_input_dtype(unet):
    unet.load_lora_adapter(random_lora(unet, PATHS, 4, 0), adapter_name="a")
    layer = unet.get_submodule(PATHS[3])
    x = _input(layer)
    with torch.no_grad():
        expected = layer(x)
        unet.to(torch.bfloat16)  # what the precision pass does after loading
        got = layer(x.to(torch.bfloat16))
    entry = chain_entry(layer, "lora")
    assert got.dtype == torch.bfloat16 and (torch.bfloat16, torch.device("cpu")) in entry.packs
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_fused_qkv_adds_the_adapter_after_its_matmul_and_is_refreshed_after_fusing(sd_folder):
    plain = runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    fused = runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    fused.fuse_qkv_projections()
    sd = random_lora(plain, [f"{ATTN}.to_q"], 4, 0)
    attn_plain, attn_fused = plain.get_submodule(ATTN), fused.get_submodule(ATTN)
    x = torch.randn(2, 16, attn_plain.to_q.in_features, generator=torch.Generator().manual_seed(0))
    for model in (plain, fused):
        model.load_lora_adapter(sd, adapter_name="a")
    with torch.no_grad():
        assert not attn_fused.to_q.computes_operator() and len(attn_fused.to_q.side_terms()) == 1
        # the fused matmul, then the adapter's term on q's slice: the separate projections' result
        torch.testing.assert_close(attn_fused(x), attn_plain(x), rtol=1e-5, atol=1e-5)
        fused.disable_lora()
        assert not torch.allclose(attn_fused(x), attn_plain(x), rtol=1e-5, atol=1e-5)  # the term mattered
        fused.enable_lora()
        for model in (plain, fused):
            model.fuse_lora()
        assert attn_fused.to_q.computes_operator()  # entry unplugged
        expected_qkv = torch.cat([attn_fused.to_q.weight, attn_fused.to_k.weight, attn_fused.to_v.weight])
        assert torch.equal(attn_fused.to_qkv.weight, expected_qkv)  # refreshed in place
        torch.testing.assert_close(attn_fused(x), attn_plain(x), rtol=1e-5, atol=1e-5)
        fused.unfuse_lora()
        fresh = runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
        fresh.fuse_qkv_projections()
        assert torch.equal(attn_fused.to_qkv.weight, fresh.get_submodule(ATTN).to_qkv.weight)


def test_text_encoder_keys_with_and_without_text_model(text_encoder):
    paths = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
    with_prefix = random_lora(text_encoder, paths, 4, 0, prefix="text_encoder")
    flat = {k.replace("text_encoder.text_model.", ""): v for k, v in with_prefix.items()}  # transformers 5 names
    x = torch.randint(0, 50, (1, 12))
    text_encoder.load_lora_adapter(with_prefix, adapter_name="a")
    with torch.no_grad():
        expected = text_encoder(x)[0]
    text_encoder.unload_lora()
    text_encoder.load_lora_adapter(flat, prefix=None, adapter_name="a")
    with torch.no_grad():
        assert torch.equal(text_encoder(x)[0], expected)
    assert text_encoder.active_adapters() == ["a"] and text_encoder.get_list_adapters() == ["a"]
    assert text_encoder.peft_config["a"]["target_modules"] == sorted(p.removeprefix("text_model.") for p in paths)


def test_per_block_weights_give_layers_near_the_root_one(unet):
    sd = random_lora(unet, ["conv_in", "time_embedding.linear_1", f"{ATTN}.to_q", "down_blocks.1.resnets.0.conv1",
                            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"], 4, 0)
    unet.load_lora_adapter(sd, adapter_name="a")
    unet.set_adapters("a", {"down": 0.5, "mid": 0.25})
    state = lora_state(unet)
    scaling = {p: e.adapters["a"].scaling for p, e in state.entries.items()}
    assert scaling["conv_in"] == scaling["time_embedding.linear_1"] == 1.0
    assert scaling[f"{ATTN}.to_q"] == scaling["down_blocks.1.resnets.0.conv1"] == 0.5  # resnet 0: attention 0's
    assert scaling["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] == 0.25
    with pytest.raises(LoraError, match="expected 2 weights for down.block_1"):
        unet.set_adapters("a", {"down": {"block_1": [1.0, 0.5, 0.2]}})
    with pytest.raises(LoraError, match=r"not loaded .*\['a'\]"):
        unet.set_adapters("nope")


def test_hotswap_copies_into_fixed_rank_buffers(unet, sd_folder):
    a, b = random_lora(unet, PATHS, 4, 0), random_lora(unet, PATHS[:5], 8, 1)
    unet.enable_lora_hotswap(target_rank=8)
    unet.load_lora_adapter(a, adapter_name="x")
    layer = unet.get_submodule(PATHS[0])
    entry = chain_entry(layer, "lora")
    packs = entry.packs[(torch.float32, torch.device("cpu"))]
    x = _input(layer)
    unet.load_lora_adapter(b, adapter_name="x", hotswap=True)
    assert entry.packs[(torch.float32, torch.device("cpu"))] is packs  # same tensors, new values
    direct = runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    direct.load_lora_adapter(b, adapter_name="x")
    for path in PATHS:  # layers b leaves alone add nothing any more (peft zeroes them)
        with torch.no_grad():
            torch.testing.assert_close(unet.get_submodule(path)(_input(unet.get_submodule(path))),
                                       direct.get_submodule(path)(_input(direct.get_submodule(path))),
                                       rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert layer(x).shape == direct.get_submodule(PATHS[0])(x).shape
    too_big = random_lora(unet, PATHS[:1], 16, 2)
    with pytest.raises(LoraError, match=r"rank 16, above the hotswap target_rank 8"):
        unet.load_lora_adapter(too_big, adapter_name="x", hotswap=True)
    with pytest.raises(LoraError, match=r"rank 16, above the hotswap target_rank 8"):
        unet.load_lora_adapter(too_big, adapter_name="y")
    with pytest.raises(LoraError, match="no adapter named 'nope'"):
        unet.load_lora_adapter(a, adapter_name="nope", hotswap=True)
    with pytest.raises(LoraError, match="cannot adapt new layers"):
        unet.load_lora_adapter(random_lora(unet, ["conv_in"], 4, 3), adapter_name="x", hotswap=True)
    fresh = runtime.UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    fresh.load_lora_adapter(a, adapter_name="x")
    with pytest.raises(LoraError, match="before loading the first adapter"):
        fresh.enable_lora_hotswap(target_rank=8)


def test_reweighting_and_hotswapping_do_not_recompile(text_encoder):
    from torch._dynamo.utils import counters

    paths = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"]
    text_encoder.enable_lora_hotswap(target_rank=8)
    text_encoder.load_lora_adapter(random_lora(text_encoder, paths, 4, 0, "text_encoder"), adapter_name="a")
    text_encoder.load_lora_adapter(random_lora(text_encoder, paths, 8, 1, "text_encoder"), adapter_name="b")
    text_encoder.set_adapters(["a", "b"], [0.5, 0.5])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(text_encoder, backend="eager", dynamic=True, fullgraph=True)
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        compiled(ids)
        graphs = counters["stats"]["unique_graphs"]
        for change in (lambda: text_encoder.set_adapters(["a", "b"], [0.2, 0.9]),
                       lambda: text_encoder.load_lora_adapter(random_lora(text_encoder, paths, 2, 2, "text_encoder"),
                                                              adapter_name="b", hotswap=True)):
            change()
            torch.testing.assert_close(compiled(ids)[0], text_encoder(ids)[0])
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_compile_pass_turns_freezing_off_with_adapters(sd_folder, sd_lora, tmp_path):
    from runtime.optim.compile import CompilePass

    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    try:
        runtime.optimize(pipe, level=0, compile={"cache_dir": str(tmp_path), "force": True})
        assert "freezing off (LoRA adapters on text_encoder, unet)" in pipe.optimization.notes["compile"]
        pipe.set_adapters("a", 0.5)  # unfrozen compiled code reads the adapters: changes are fine
    finally:
        pipe.optimization.revert()
    assert "freezing=True would bake" in CompilePass(freezing=True).supports(pipe)
    pipe.unload_lora_weights()
    try:  # compiled with freezing, without adapters: loading one later is refused, clearly
        runtime.optimize(pipe, level=0, compile={"cache_dir": str(tmp_path), "freezing": True, "force": True})
        with pytest.raises(LoraError, match="compiled with inductor freezing"):
            pipe.load_lora_weights(str(sd_lora), adapter_name="a")
        assert pipe.get_list_adapters() == {}
    finally:
        pipe.optimization.revert()


# ---- bad input ------------------------------------------------------------------------------------
def test_a_lora_for_another_architecture_names_the_key_and_family(sd_folder, sdxl_lora, unet):
    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    with pytest.raises(LoraError) as err:
        pipe.load_lora_weights(str(sdxl_lora))
    message = str(err.value)
    assert "unet." in message and "PEFT/diffusers" in message and "pytorch_lora_weights.safetensors" in message
    assert pipe.get_list_adapters() == {}  # all or nothing
    sd = {"unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64),
          "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(LoraError, match=r"'unet.down_blocks.7.attentions.0.proj_in.lora_A.weight' matches no module"
                                        r".*closest module here is 'down_blocks.1.attentions.0.proj_in'"):
        unet.load_lora_adapter(sd)


def test_shape_mismatch_names_the_key_and_both_shapes(unet):
    sd = random_lora(unet, [f"{ATTN}.to_q"], 4, 0)
    sd[f"unet.{ATTN}.to_q.lora_A.weight"] = torch.zeros(4, 7)
    with pytest.raises(LoraError, match=rf"unet.{ATTN}.to_q.lora_A.weight' has shape \(4, 7\) but unet.{ATTN}.to_q "
                                        r"\(Linear 64->64\) needs \(4, 64\)"):
        unet.load_lora_adapter(sd)
    assert lora_state(unet) is None


def test_adapter_name_in_use(unet):
    sd = random_lora(unet, PATHS[:2], 4, 0)
    unet.load_lora_adapter(sd, adapter_name="a")
    with pytest.raises(LoraError, match="adapter name 'a' is already in use"):
        unet.load_lora_adapter(sd, adapter_name="a")
    assert unet.load_lora_adapter(sd) == "default_1"


@pytest.mark.parametrize("sd, what", [({"conv_in.weight": torch.zeros(3)}, "no LoRA keys"),
                                      ({"emb_params": torch.zeros(2, 32)}, "textual-inversion"),
                                      ({}, "empty")])
def test_a_file_with_no_lora_keys(sd_folder, tmp_path, sd, what):
    from safetensors.torch import save_file

    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    with pytest.raises(LoraError, match=what):
        pipe.load_lora_weights(sd)
    if sd:
        save_file(sd, str(tmp_path / "x.safetensors"))
        with pytest.raises(LoraError, match=r"x.safetensors: no LoRA keys"):
            pipe.load_lora_weights(str(tmp_path), weight_name="x.safetensors")


def test_safe_fusing_refuses_nan_and_fuses_nothing(unet):
    sd = random_lora(unet, PATHS[:3], 4, 0)
    sd[f"unet.{PATHS[1]}.lora_B.weight"][0, 0] = float("nan")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(sd, adapter_name="bad")
    with pytest.raises(LoraError, match=rf"'bad' into unet.{PATHS[1]} would give \d+ NaN/inf"):
        unet.fuse_lora(safe_fusing=True)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert not lora_state(unet).entries[PATHS[0]].fused


def test_pipeline_level_argument_errors(sd_folder, sd_lora):
    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.load_lora_weights(str(sd_lora), adapter_name="a")
    with pytest.raises(LoraError, match=r"adapter name\(s\) \['zz'\] are not loaded"):
        pipe.set_adapters(["a", "zz"])
    with pytest.raises(LoraError, match="2 adapter name"):
        pipe.set_adapters(["a", "a"], [1.0])
    with pytest.raises(LoraError, match="components cannot be an empty list"):
        pipe.fuse_lora(components=[])
    with pytest.raises(LoraError, match="'vae' is not a LoRA component"):
        pipe.fuse_lora(components=["vae"])
    with pytest.raises(LoraError, match="unexpected keyword"):
        pipe.load_lora_weights(str(sd_lora), adapter_name="b", wieght_name="x")
    with pytest.raises(FileNotFoundError):
        pipe.load_lora_weights(str(sd_lora), weight_name="missing.safetensors")
    with pytest.raises(LoraError, match="before loading the first adapter"):
        pipe.enable_lora_hotswap(target_rank=8)
    pipe.set_lora_device(["a"], "cpu")  # cast on use anyway: moving is about memory
    assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}


def test_a_copied_model_carries_its_own_adapters(unet):
    import copy

    unet.load_lora_adapter(random_lora(unet, PATHS[:2], 4, 0), adapter_name="a")
    twin = copy.deepcopy(unet)
    layer, twin_layer = unet.get_submodule(PATHS[0]), twin.get_submodule(PATHS[0])
    x = _input(layer)
    with torch.no_grad():
        assert torch.equal(twin_layer(x), layer(x))
        twin.set_adapters("a", 0.0)
        assert not torch.equal(twin_layer(x), layer(x))  # the original keeps weight 1.0
    assert chain_entry(twin_layer, "lora").state is lora_state(twin)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_term_written_into_the_output_equals_the_term_added_after(unet, layout):
    """Without autograd the up projection runs as one addmm_ / baddbmm_ into the base output; with it, the
    term is a tensor added after: both give base + up(down(x)), for linears (3-D inputs) and convolutions
    (3x3 and 1x1, NCHW and channels-last), at a call-time scale."""
    paths = [n for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k", "ff.net.2", "proj_in"))
             or n.endswith(("resnets.0.conv1", "resnets.0.conv2", "conv_shortcut"))]
    assert any(isinstance(unet.get_submodule(p), torch.nn.Conv2d) for p in paths)
    unet.load_lora_adapter(random_lora(unet, paths, 4, 3), adapter_name="a")
    if layout == "channels_last":
        unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with lora_state(unet).scaled(0.7):
        with torch.no_grad():
            folded = unet(x, 3, encoder_hidden_states=ctx).sample
        xg = x.clone().requires_grad_(True)
        separate = unet(xg, 3, encoder_hidden_states=ctx).sample.detach()
    torch.testing.assert_close(folded, separate, rtol=1e-5, atol=1e-5)
    unet.disable_lora()
    with torch.no_grad():
        plain = unet(x, 3, encoder_hidden_states=ctx).sample
    assert (folded - plain).abs().max() > 1e-3  # the adapters were applied
