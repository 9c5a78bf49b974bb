"""Property-based fuzzing of the loaders that came after the first fuzz set: LoRA files (PEFT and
Kohya layouts, as a state dict and as a safetensors file with metadata), textual-inversion files and
single-file (original layout) checkpoints.

The property, for every input: loading works, or raises one of the documented errors
(``runtime.errors.RuntimeErrorBase``) with a message, within the profile's deadline. A failed load
leaves the pipeline as it was (no adapter, no token, no chain entry added); a state dict passed in is
never mutated; a load that works gives a pipeline whose UNet still runs. Profiles:
tests/reliability/conftest.py (``HYPOTHESIS_PROFILE=long`` for the long run).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import runtime
from runtime.errors import RuntimeErrorBase
from runtime.optim.undo import entry as chain_entry

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import single_file_reference as ref  # noqa: E402

N = settings.default.max_examples
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]


def documented(fn, *args, **kwargs):
    """Run ``fn``; an error must be one of ours, with a message. Returns the result or the error."""
    try:
        return fn(*args, **kwargs)
    except RuntimeErrorBase as exc:
        assert str(exc), "an error without a message"
        event(type(exc).__name__)
        return exc


# ---- the edits ------------------------------------------------------------------------------------
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
values = st.sampled_from(["randn", "nan", "inf", "zeros"])


def tensor(shape, dtype, value) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.01
    if value == "nan":
        t = torch.full(shape, float("nan"))
    elif value == "inf":
        t = torch.full(shape, float("inf"))
    elif value == "zeros":
        t = torch.zeros(shape)
    return t.to(dtype)


def key_edits(extra_keys: list[str]):
    """One edit of a state dict: drop a key, rename it, give it another shape, dtype or values, or add one."""
    pick = st.integers(0, 10**6)
    return st.one_of(
        st.tuples(st.just("drop"), pick, st.none()),
        st.tuples(st.just("rename"), pick, st.text(min_size=1, max_size=10) | st.sampled_from(extra_keys)),
        st.tuples(st.just("shape"), pick, st.tuples(shapes, values)),
        st.tuples(st.just("dtype"), pick, st.sampled_from(DTYPES)),
        st.tuples(st.just("values"), pick, values),
        st.tuples(st.just("add"), pick, st.tuples(st.text(min_size=1, max_size=12) | st.sampled_from(extra_keys), shapes)),
    )


def edited(sd: dict, ops) -> dict:
    """A new dict: ``sd`` with ``ops`` applied (``sd`` and its tensors are left as they are)."""
    out = dict(sd)
    for op, pick, arg in ops:
        keys = sorted(out)
        if not keys and op != "add":
            continue
        key = keys[pick % len(keys)] if keys else ""
        if op == "drop":
            del out[key]
        elif op == "rename":
            out[arg] = out.pop(key)
        elif op == "shape":
            out[key] = tensor(arg[0], torch.float32, arg[1])
        elif op == "dtype":
            out[key] = out[key].to(arg)
        elif op == "values":
            out[key] = tensor(tuple(out[key].shape), out[key].dtype if out[key].is_floating_point() else torch.float32, arg)
        else:
            out[arg[0]] = tensor(arg[1], torch.float32, "randn")
    return out


def save(sd: dict, path: Path, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ---- LoRA files ------------------------------------------------------------------------------------
def _targets(pipe) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    unet = [(n, m) for n, m in pipe.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v", "proj_in"))
            or n.endswith("resnets.0.conv1")]
    te = [(n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith(("q_proj", "v_proj"))]
    return {"unet": unet, "text_encoder": te}


def _pair(module, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if isinstance(module, torch.nn.Conv2d):
        k = module.kernel_size
        return (torch.randn(r, module.in_channels, *k, generator=g) * 0.1,
                torch.randn(module.out_channels, r, 1, 1, generator=g) * 0.1)
    return torch.randn(r, module.in_features, generator=g) * 0.1, torch.randn(module.out_features, r, generator=g) * 0.1


def peft_lora(pipe, r: int = 2) -> dict:
    out = {}
    for component, modules in _targets(pipe).items():
        for i, (name, m) in enumerate(modules):
            down, up = _pair(m, r, i)
            out[f"{component}.{name}.lora_A.weight"], out[f"{component}.{name}.lora_B.weight"] = down, up
    return out


def kohya_lora(pipe, r: int = 2) -> dict:
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    out = {}
    for component, modules in _targets(pipe).items():
        for i, (name, m) in enumerate(modules):
            if component == "text_encoder":
                name = "text_model." + name if not name.startswith("text_model.") else name
            key = prefixes[component] + name.replace(".", "_")
            down, up = _pair(m, r, i)
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
            out[f"{key}.alpha"] = torch.tensor(float(r))
    return out


@pytest.fixture(scope="module")
def lora_pipe(sd_folder):
    pipe = runtime.StableDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_files(lora_pipe):
    return {"peft": peft_lora(lora_pipe), "kohya": kohya_lora(lora_pipe)}


def _lora_entries(pipe) -> int:
    return sum(chain_entry(m, "lora") is not None for model in (pipe.unet, pipe.text_encoder) for m in model.modules())


def _unet_runs(pipe) -> None:
    cfg = pipe.unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8)
    ctx = torch.randn(1, 3, cfg.cross_attention_dim)
    with torch.no_grad():
        out = documented(pipe.unet, x, 1, encoder_hidden_states=ctx)
    assert isinstance(out, RuntimeErrorBase) or out.sample.shape == x.shape


@given(layout=st.sampled_from(["peft", "kohya"]), ops=st.lists(key_edits(["unet.x.lora_A.weight", "lora_unet_x.alpha",
                                                                          "text_encoder.dora_scale"]),
                                                               min_size=1, max_size=3),
       as_file=st.booleans(), metadata=st.none() | st.dictionaries(st.sampled_from(["lora_adapter_metadata", "format"]),
                                                                   st.text(max_size=20), max_size=2))
@settings(max_examples=N)
def test_lora_file(lora_pipe, lora_files, layout, ops, as_file, metadata):
    pipe = lora_pipe
    sd = edited(lora_files[layout], ops)
    before = {k: v for k, v in sd.items()}
    adapters, entries = pipe.get_list_adapters(), _lora_entries(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        source = str(save(sd, Path(tmp) / "lora.safetensors", metadata)) if as_file else sd
        out = documented(pipe.load_lora_weights, source, adapter_name="fuzz")
    if not as_file:
        assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)  # never mutated
    if isinstance(out, RuntimeErrorBase):
        assert pipe.get_list_adapters() == adapters and _lora_entries(pipe) == entries  # nothing half-loaded
        return
    try:
        _unet_runs(pipe)
    finally:
        pipe.delete_adapters("fuzz")
    assert _lora_entries(pipe) == entries


# ---- textual inversion ----------------------------------------------------------------------------
@given(kind=st.sampled_from(["a1111", "diffusers"]), ops=st.lists(key_edits(["string_to_param", "emb_params", "*"]),
                                                                   max_size=3),
       width=st.sampled_from([None, 3, 0]), vectors=st.integers(1, 3), token=st.none() | st.text(max_size=6))
@settings(max_examples=N // 2)
def test_textual_inversion_file(lora_pipe, kind, ops, width, vectors, token):
    pipe = lora_pipe
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1] if width is None else width
    emb = torch.randn(vectors, dim) * 0.01
    sd = {"string_to_param": {"*": emb}} if kind == "a1111" else {"<fuzz>": emb}
    if kind == "a1111":
        sd = {"string_to_param": edited({"*": emb}, ops)}
    else:
        sd = edited(sd, ops)
    vocab, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ti.pt"
        torch.save(sd, path)
        out = documented(pipe.load_textual_inversion, str(path), token=token)
    if isinstance(out, RuntimeErrorBase):
        assert len(pipe.tokenizer) == vocab and pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows
        return
    pipe.unload_textual_inversion()
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows


# ---- single-file checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original_layout(sd_folder):
    return ref.pipeline_to_ldm(sd_folder, {"text_encoder": ("clip", "cond_stage_model.transformer.", False)})


@given(ops=st.lists(key_edits(["model.diffusion_model.x.weight", "first_stage_model.encoder.conv_in.weight",
                               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                               "model_ema.decay"]), min_size=1, max_size=3),
       with_config=st.booleans())
@settings(max_examples=N // 2)
def test_single_file_keys(sd_folder, original_layout, ops, with_config):
    sd = edited(original_layout, ops)
    kwargs = {"config": str(sd_folder)} if with_config else {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save(sd, Path(tmp) / "model.safetensors")
        out = documented(runtime.StableDiffusionPipeline.from_single_file, str(path), **kwargs)
    assert isinstance(out, (runtime.StableDiffusionPipeline, RuntimeErrorBase))


def test_lora_fuzz_inputs_are_valid_when_unedited(lora_pipe, lora_files):
    """The fuzzed inputs start from files that load: an edit is what breaks them, not the base."""
    for layout, sd in lora_files.items():
        lora_pipe.load_lora_weights(sd, adapter_name="base")
        assert _lora_entries(lora_pipe) > 0, layout
        lora_pipe.delete_adapters("base")
    assert _lora_entries(lora_pipe) == 0
    json.dumps(sorted(lora_files["peft"]))  # keys are plain strings


def test_single_file_without_a_key_config_inference_needs_is_a_config_error(original_layout, tmp_path):
    """Found by test_single_file_keys: a file without CLIP's position embedding was a KeyError."""
    key = "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"
    sd = {k: v for k, v in original_layout.items() if k != key}
    path = save(sd, tmp_path / "model.safetensors")
    with pytest.raises(runtime.errors.ConfigError, match="embeddings.position_embedding.weight"):
        runtime.StableDiffusionPipeline.from_single_file(str(path))
