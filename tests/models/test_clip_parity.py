"""Our CLIP text encoders against transformers' on tiny random configs (weights copied across)."""
from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from runtime.models import CLIPTextModel, CLIPTextModelWithProjection, ModelMixin  # noqa: E402
from runtime.models.errors import ConfigError, InputError  # noqa: E402

TOL = 1e-5  # fp32: max|ours - ref| <= TOL * max(1, max|ref|)
VOCAB, BOS, EOS = 1000, 998, 999


def tiny_config(hidden_act="quick_gelu", eos_token_id=EOS, layers=3) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, projection_dim=24,
                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=24,
                hidden_act=hidden_act, bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1)


def reference(cls_name: str, config: dict):
    torch.manual_seed(0)
    ref = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine and biases, so a swapped weight shows
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return ref


def ours_like(cls, ref, layout="text_model"):
    model = cls.from_config(ref.config.to_dict()).eval()
    state = ref.state_dict()
    if layout == "text_model" and not any(k.startswith("text_model.") for k in state):
        state = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in state.items()}
    elif layout == "prefixless":
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def token_batch(pad_id=EOS, seed=1):
    """Two rows like the tokenizer makes: bos, words, eos, then right padding (row 0 shorter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, BOS - 1, (2, 16), generator=g)
    ids[:, 0] = BOS
    ids[0, 9], ids[0, 10:] = EOS, pad_id
    ids[1, 15] = EOS
    mask = (torch.arange(16)[None] <= torch.tensor([[9], [15]])).long()
    return ids, mask


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), err


PAIRS = [(CLIPTextModel, "CLIPTextModel"), (CLIPTextModelWithProjection, "CLIPTextModelWithProjection")]


@pytest.mark.parametrize("cls,ref_name", PAIRS, ids=["plain", "projection"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("layout", ["text_model", "prefixless"])
@pytest.mark.parametrize("use_mask", [False, True], ids=["nomask", "mask"])
def test_outputs_match_transformers(cls, ref_name, hidden_act, layout, use_mask):
    ref = reference(ref_name, tiny_config(hidden_act))
    ours = ours_like(cls, ref, layout)
    ids, mask = token_batch()
    kwargs = {"attention_mask": mask} if use_mask else {}
    with torch.no_grad():
        a = ours(ids, output_hidden_states=True, **kwargs)
        b = ref(ids, output_hidden_states=True, **kwargs)
    assert_close(a.last_hidden_state, b.last_hidden_state)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    assert_close(a.hidden_states[-2], b.hidden_states[-2])
    assert_close(a.hidden_states[0], b.hidden_states[0])
    pooled = "pooler_output" if cls is CLIPTextModel else "text_embeds"
    assert_close(getattr(a, pooled), getattr(b, pooled))
    # Positional access as the pipelines use it: SD out[0], SDXL pooled out[0] and out[-1][-2].
    assert_close(a[0], b[0])
    assert_close(a[-1][-2], b[-1][-2])


@pytest.mark.parametrize("eos_token_id,pooled_at", [(2, 15), (500, 7)], ids=["legacy-eos-2", "eos-id"])
def test_pooling_rule_matches_transformers(eos_token_id, pooled_at):
    """eos_token_id == 2 (SD 1.x/SDXL configs) pools at argmax(input_ids); otherwise at the first EOS."""
    ref = reference("CLIPTextModel", tiny_config(eos_token_id=eos_token_id))
    ours = ours_like(CLIPTextModel, ref)
    ids, _ = token_batch()
    ids[(ids == 2) | (ids == 500)] = 3
    ids[1, 3], ids[1, 7] = 2, 500  # row 1: id 2 at 3, id 500 at 7, the largest id (999) at 15
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    assert_close(a.pooler_output, b.pooler_output)
    assert torch.equal(a.pooler_output[1], a.last_hidden_state[1, pooled_at])


def test_tuple_output_and_return_dict_false():
    ref = reference("CLIPTextModelWithProjection", tiny_config())
    ours = ours_like(CLIPTextModelWithProjection, ref)
    ids, _ = token_batch()
    with torch.no_grad():
        out = ours(ids, return_dict=False)
        full = ours(ids)
    assert len(out) == 2 and torch.equal(out[0], full.text_embeds) and torch.equal(out[1], full.last_hidden_state)
    assert full["text_embeds"] is full.text_embeds


def test_legacy_position_ids_buffer_is_dropped_and_saved_layout_is_text_model():
    ref = reference("CLIPTextModel", tiny_config())
    ours = CLIPTextModel.from_config(ref.config.to_dict())
    state = {"text_model." + k: v for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(24)[None]  # transformers < 4.31 saved it
    result = ours.load_state_dict(state, strict=True)
    assert not result.unexpected_keys
    assert all(k.startswith("text_model.") for k in ours.state_dict())
    proj = CLIPTextModelWithProjection.from_config(tiny_config())
    assert set(proj.state_dict()) == set(reference("CLIPTextModelWithProjection", tiny_config()).state_dict())


def test_missing_and_unexpected_keys_are_reported():
    ours = CLIPTextModel.from_config(tiny_config())
    state = {k: v for k, v in reference("CLIPTextModel", tiny_config()).state_dict().items()
             if "final_layer_norm" not in k}
    state["encoder.layers.0.bogus"] = torch.zeros(1)
    result = ours.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    assert result.unexpected_keys == ["text_model.encoder.layers.0.bogus"]


def test_gradient_checkpointing_gives_equal_gradients():
    ref = reference("CLIPTextModelWithProjection", tiny_config())
    ids, mask = token_batch()
    grads = []
    for checkpointing in (False, True):
        model = ours_like(CLIPTextModelWithProjection, ref).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        (out.text_embeds.square().sum() + out.hidden_states[-2].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=0, atol=1e-6), name


def test_attention_backend_slot_and_fused_qkv_are_exact():
    ref = reference("CLIPTextModel", tiny_config())
    ours = ours_like(CLIPTextModel, ref)
    ids, mask = token_batch()
    with torch.no_grad():
        base = ours(ids, attention_mask=mask).last_hidden_state
    seen = []

    def recording_backend(q, k, v, m):
        seen.append((q.shape, m.dtype, m.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)

    ours.set_attention_backend(recording_backend)
    assert len(ours.attention_modules()) == 3
    with torch.no_grad():
        routed = ours(ids, attention_mask=mask).last_hidden_state
    assert len(seen) == 3 and seen[0] == ((2, 4, 16, 8), torch.float32, (2, 1, 16, 16))
    assert torch.equal(routed, base)
    ours.set_attention_backend(None)
    ours.fuse_qkv_projections()
    assert all(m.fused == "qkv" for m in ours.attention_modules())
    with torch.no_grad():
        fused = ours(ids, attention_mask=mask).last_hidden_state
    assert_close(fused, base)
    ours.unfuse_qkv_projections()
    with torch.no_grad():
        assert torch.equal(ours(ids, attention_mask=mask).last_hidden_state, base)


def test_transformers_config_loads_without_warnings(caplog):
    config = reference("CLIPTextModel", tiny_config()).config.to_diff_dict()
    config.update(architectures=["CLIPTextModel"], torch_dtype="float32", dropout=0.0)
    with caplog.at_level(logging.WARNING):
        model = CLIPTextModel.from_config(config)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert model.config.hidden_size == 32 and model.config.architectures == ["CLIPTextModel"]
    assert model.config.model_type == "clip_text_model"
    with caplog.at_level(logging.WARNING):
        CLIPTextModel.from_config(dict(config, not_a_clip_key=1))
    assert "not_a_clip_key" in caplog.text


def test_bad_config_and_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="hidden_act.*'relu'"):
        CLIPTextModel.from_config(tiny_config(hidden_act="relu"))
    with pytest.raises(ConfigError, match="hidden_size=32.*num_attention_heads=5"):
        CLIPTextModel.from_config(dict(tiny_config(), num_attention_heads=5))
    model = CLIPTextModel.from_config(tiny_config())
    with pytest.raises(InputError, match="sequence length 30 exceeds max_position_embeddings=24"):
        model(torch.zeros(1, 30, dtype=torch.long))
    with pytest.raises(InputError, match="attention_mask shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("cls,ref_name", PAIRS, ids=["plain", "projection"])
def test_from_pretrained_and_save_pretrained_with_transformers(tmp_path, cls, ref_name):
    if "from_pretrained" not in vars(ModelMixin):
        pytest.skip("ModelMixin.from_pretrained is not written yet")
    ref = reference(ref_name, tiny_config())
    ref.save_pretrained(tmp_path / "tf")
    ours = cls.from_pretrained(tmp_path / "tf").eval()
    ids, mask = token_batch()
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask)[0], ref(ids, attention_mask=mask)[0])
    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, ref_name).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(back(ids, attention_mask=mask)[0], ref(ids, attention_mask=mask)[0])
        assert_close(cls.from_pretrained(tmp_path / "ours")(ids)[0], ref(ids)[0])


def test_from_pretrained_reads_an_sd_style_text_encoder_folder(tmp_path, caplog):
    """SD 1.x layout: text_model.* keys, the legacy position_ids buffer, transformers 4.x config keys."""
    if "from_pretrained" not in vars(ModelMixin):
        pytest.skip("ModelMixin.from_pretrained is not written yet")
    import json

    from safetensors.torch import save_file

    ref = reference("CLIPTextModel", tiny_config(eos_token_id=2))
    state = {"text_model." + k: v.contiguous() for k, v in ref.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(24)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    config = dict(tiny_config(eos_token_id=2), _name_or_path="openai/clip-vit-large-patch14", dropout=0.0,
                  architectures=["CLIPTextModel"], model_type="clip_text_model", torch_dtype="float32",
                  transformers_version="4.22.0.dev0")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        ours = CLIPTextModel.from_pretrained(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    ids, mask = token_batch()
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert_close(a.pooler_output, b.pooler_output)
    assert_close(a.hidden_states[-2], b.hidden_states[-2])
