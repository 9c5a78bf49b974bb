"""Property-based fuzzing of the loaders: safetensors headers, config.json, model_index.json,
scheduler configs and tokenizer files.

The property, for every input: loading either works or raises one of the documented errors
(``runtime.errors.RuntimeErrorBase`` and its subclasses), within the profile's deadline (no hang)
and without a memory blow-up. CI runs the bounded ``ci`` profile (tests/reliability/conftest.py);
``HYPOTHESIS_PROFILE=long`` runs 2000 examples per property. Inputs that crashed a loader are
kept as ``@example`` cases or explicit tests below (named for the bug they found).
"""
from __future__ import annotations

import json
import math
import resource
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import runtime
from runtime.errors import RuntimeErrorBase
from runtime.models.safetensors_io import load_safetensors, read_header

N = settings.default.max_examples  # the profile's budget; the slower properties take a share of it

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 130)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def documented(fn, *args, **kwargs):
    """Run ``fn``; an error must be one of ours. Returns the result or the error."""
    try:
        return fn(*args, **kwargs)
    except RuntimeErrorBase as exc:
        assert str(exc), "an error without a message"
        return exc


def dumps(value) -> str:
    return json.dumps(value, allow_nan=True)  # Python's json reads NaN/Infinity back: so may a bad file


@pytest.fixture(scope="module", autouse=True)
def _bounded_memory():
    """No memory blow-up: the process's peak RSS grows by less than 1 GiB over the whole module."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024, f"peak RSS grew by {grown_mib:.0f} MiB while fuzzing"


# ---- safetensors headers -----------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "X", ""]
tensor_info = st.fixed_dictionaries(
    {"dtype": st.sampled_from(DTYPES) | json_scalars,
     "shape": st.lists(st.integers(-2, 2**40) | st.integers(0, 8), max_size=4) | json_values,
     "data_offsets": st.tuples(st.integers(-4, 2**63), st.integers(-4, 2**63)).map(list)
     | st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list) | json_values},
)
headers = st.dictionaries(st.text(max_size=10), tensor_info | json_values, max_size=4)


def write_st(folder: Path, header_bytes: bytes, data: bytes, length: int | None = None) -> Path:
    path = folder / "x.safetensors"
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n % 2**64) + header_bytes + data)
    return path


@given(header=headers, data=st.binary(max_size=64), length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]))
@example(header={"w": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}, data=b"\0" * 8, length_delta=0)
@example(header={"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, None]}}, data=b"\0" * 8, length_delta=0)
@example(header={"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, {}]}}, data=b"\0" * 8, length_delta=0)
@example(header={"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, math.inf]}}, data=b"\0" * 8, length_delta=0)
@example(header={"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}}, data=b"\0" * 8, length_delta=0)
@settings(max_examples=3 * N)
def test_safetensors_header(header, data, length_delta):
    raw = dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_st(Path(tmp), raw, data, len(raw) + length_delta)
        out = documented(load_safetensors, path)
        if isinstance(out, dict):
            assert all(isinstance(t, torch.Tensor) for t in out.values())


@given(blob=st.binary(max_size=200))
@example(blob=b"[" * 100_000)  # deeply nested JSON: RecursionError in the JSON parser
@settings(max_examples=N)
def test_safetensors_random_bytes(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(blob)
        out = documented(load_safetensors, path)
        assert isinstance(out, (dict, RuntimeErrorBase))  # the tensors, or one of our errors
        path.write_bytes(struct.pack("<Q", len(blob)) + blob)
        assert documented(read_header, path) is not None


# ---- config.json, model_index.json, scheduler and tokenizer files ----------------------------------
def mutations(keys: list[str]):
    """A mutation of a JSON object: set one key (an existing one or a new one) or drop it."""
    key = st.sampled_from(keys) | st.text(max_size=8)
    return st.one_of(
        st.tuples(st.just("set"), key, json_values),
        st.tuples(st.just("drop"), key, st.none()),
    )


def mutate(obj: dict, ops) -> dict:
    obj = dict(obj)
    for op, key, value in ops:
        if op == "set":
            obj[key] = value
        else:
            obj.pop(key, None)
    return obj


def whole_file():
    """Replace the file outright: random bytes, random JSON, or the JSON cut short."""
    return st.one_of(st.tuples(st.just("bytes"), st.binary(max_size=64)),
                     st.tuples(st.just("json"), json_values),
                     st.tuples(st.just("cut"), st.integers(0, 200)))


def write_whole(path: Path, original: str, how) -> None:
    kind, value = how
    if kind == "bytes":
        path.write_bytes(value)
    elif kind == "json":
        path.write_text(dumps(value))
    else:
        path.write_text(original[:value])


def edited_copy(src: Path, tmp: Path, name: str, ops, how) -> Path:
    """Copy ``src`` (a folder) into ``tmp`` and apply the edit to its file ``name``."""
    dst = Path(tmp) / src.name
    shutil.copytree(src, dst)
    path = dst / name
    original = path.read_text()
    if how is not None:
        write_whole(path, original, how)
    else:
        path.write_text(dumps(mutate(json.loads(original), ops)))
    return dst


def edits(keys):
    return st.one_of(st.tuples(st.lists(mutations(keys), min_size=1, max_size=3), st.none()),
                     st.tuples(st.just([]), whole_file()))


VAE_KEYS = ["block_out_channels", "in_channels", "out_channels", "down_block_types", "up_block_types",
            "latent_channels", "layers_per_block", "norm_num_groups", "sample_size", "scaling_factor", "act_fn",
            "_class_name", "force_upcast", "mid_block_add_attention", "latents_mean", "latents_std"]
UNET_KEYS = ["block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim",
             "attention_head_dim", "norm_num_groups", "in_channels", "out_channels", "sample_size",
             "transformer_layers_per_block", "use_linear_projection", "mid_block_type", "addition_embed_type",
             "time_embedding_type", "class_embed_type", "num_class_embeds", "only_cross_attention", "_class_name",
             "upcast_attention", "resnet_time_scale_shift", "flip_sin_to_cos", "freq_shift", "conv_in_kernel"]


@given(edit=edits(VAE_KEYS))
@example(edit=([], ("bytes", b"\x80")))  # UnicodeDecodeError from read_json
@example(edit=([("set", "_class_name", [])], None))  # TypeError: unhashable list in the class-name check
@settings(max_examples=N)
def test_vae_config_json(sd_folder, edit):
    ops, how = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = edited_copy(sd_folder / "vae", Path(tmp), "config.json", ops, how)
        out = documented(runtime.AutoencoderKL.from_pretrained, folder)
        assert isinstance(out, (runtime.AutoencoderKL, RuntimeErrorBase))


@given(edit=edits(UNET_KEYS))
@example(edit=([("set", "_class_name", {"a": 1})], None))  # TypeError: unhashable dict in the class-name check
@settings(max_examples=N)
def test_unet_config_json(sd_folder, edit):
    ops, how = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = edited_copy(sd_folder / "unet", Path(tmp), "config.json", ops, how)
        out = documented(runtime.UNet2DConditionModel.from_pretrained, folder)
        assert isinstance(out, (runtime.UNet2DConditionModel, RuntimeErrorBase))


TEXT_KEYS = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "architectures",
             "eos_token_id", "pad_token_id", "bos_token_id"]


@given(edit=edits(TEXT_KEYS))
@example(edit=([("set", "hidden_size", 32.5)], None))  # TypeError from torch.empty in CLIP's constructor
@example(edit=([("set", "num_attention_heads", None)], None))  # TypeError: None % int
@settings(max_examples=N // 2)
def test_text_encoder_config_json(sd_folder, edit):
    ops, how = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = edited_copy(sd_folder / "text_encoder", Path(tmp), "config.json", ops, how)
        out = documented(runtime.CLIPTextModel.from_pretrained, folder)
        assert isinstance(out, (runtime.CLIPTextModel, RuntimeErrorBase))


INDEX_KEYS = ["_class_name", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker",
              "feature_extractor", "requires_safety_checker", "image_encoder"]
index_entries = (st.tuples(st.sampled_from(["diffusers", "transformers", "runtime", "x"]),
                           st.sampled_from(["UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer",
                                            "DDIMScheduler", "PNDMScheduler", "Nope", "StableDiffusionPipeline"])).map(list)
                 | json_values)


@given(edit=st.one_of(
    st.tuples(st.lists(st.tuples(st.just("set"), st.sampled_from(INDEX_KEYS), index_entries), min_size=1, max_size=3),
              st.none()),
    edits(INDEX_KEYS)))
@example(edit=([("set", "_class_name", ["diffusers", "UNet2DConditionModel"])], None))  # unhashable list
@example(edit=([("set", "unet", [None, []])], None))  # unhashable list as a component's class name
@settings(max_examples=N // 2)
def test_model_index_json(sd_folder, edit):
    ops, how = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = edited_copy(sd_folder, Path(tmp), "model_index.json", ops, how)
        pipe = documented(runtime.DiffusionPipeline.from_pretrained, folder)
        assert pipe is None or isinstance(pipe, (runtime.DiffusionPipeline, RuntimeErrorBase))


SCHEDULERS = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
              "UniPCMultistepScheduler", "LCMScheduler"]
SCHEDULER_KEYS = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                  "timestep_spacing", "steps_offset", "clip_sample", "set_alpha_to_one", "solver_order",
                  "algorithm_type", "use_karras_sigmas", "rescale_betas_zero_snr", "thresholding", "final_sigmas_type",
                  "skip_prk_steps", "clip_sample_range", "sample_max_value", "variance_type", "interpolation_type",
                  "timestep_type", "original_inference_steps", "lower_order_final", "solver_type", "_class_name"]


def use_scheduler(cls, folder: Path):
    sched = cls.from_pretrained(folder)
    sched.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    t = sched.timesteps[0]
    out = sched.step(x, t, sched.scale_model_input(x, t), return_dict=False)[0]
    return out


@given(name=st.sampled_from(SCHEDULERS), edit=edits(SCHEDULER_KEYS))
@example(name="DDIMScheduler", edit=([("set", "num_train_timesteps", 0)], None))  # IndexError in __init__
@example(name="DDIMScheduler", edit=([("set", "num_train_timesteps", None)], None))  # TypeError in linspace
@example(name="EulerDiscreteScheduler", edit=([("set", "num_train_timesteps", 10**9)], None))  # 4 GB of betas
@example(name="DPMSolverMultistepScheduler", edit=([("set", "trained_betas", False)], None))  # 0-d betas
@example(name="LMSDiscreteScheduler", edit=([("set", "trained_betas", [])], None))  # empty: IndexError
@example(name="DDPMScheduler", edit=([("set", "trained_betas", [0.5, 0.5])], None))  # shorter than the schedule
@example(name="DDIMScheduler", edit=([("set", "steps_offset", None)], None))  # TypeError in set_timesteps
@example(name="DDIMScheduler", edit=([("set", "steps_offset", [])], None))
@example(name="EulerDiscreteScheduler", edit=([("set", "beta_start", "0.1")], None))
@example(name="DDIMScheduler", edit=([("set", "beta_schedule", "squaredcos_cap_v2"),
                                      ("set", "num_train_timesteps", 10**8)], None))  # a 10**8-step Python loop
@settings(max_examples=2 * N)
def test_scheduler_config(sd_folder, name, edit):
    ops, how = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = edited_copy(sd_folder / "scheduler", Path(tmp), "scheduler_config.json", ops, how)
        out = documented(use_scheduler, getattr(runtime, name), folder)
        assert isinstance(out, (torch.Tensor, RuntimeErrorBase))  # a step's sample, or one of our errors


TOKENIZER_FILES = ["vocab.json", "tokenizer_config.json", "special_tokens_map.json"]
TOKENIZER_KEYS = ["bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "added_tokens_decoder",
                  "<|endoftext|>", "<|startoftext|>", "a", "re"]


def use_tokenizer(folder: Path):
    tok = runtime.CLIPTokenizer.from_pretrained(folder)
    ids = tok(["a red circle", ""], padding="max_length", truncation=True, max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    return tok.batch_decode(ids)


@given(name=st.sampled_from(TOKENIZER_FILES), edit=edits(TOKENIZER_KEYS))
@example(name="tokenizer_config.json", edit=([("set", "added_tokens_decoder", [])], None))
@example(name="tokenizer_config.json", edit=([("set", "added_tokens_decoder", {"x": {"content": "a"}})], None))
@example(name="tokenizer_config.json", edit=([("set", "added_tokens_decoder", {"1": 3})], None))
@example(name="tokenizer_config.json", edit=([("set", "model_max_length", "abc")], None))
@example(name="tokenizer_config.json", edit=([("set", "model_max_length", 10**30)], None))
@example(name="tokenizer_config.json", edit=([("set", "model_max_length", -1)], None))
@example(name="special_tokens_map.json", edit=([("set", "bos_token", {"x": 1})], None))
@example(name="vocab.json", edit=([("set", "a", "b")], None))
@example(name="vocab.json", edit=([], ("json", [1, 2])))
@settings(max_examples=N)
def test_tokenizer_json_files(sd_folder, name, edit):
    ops, how = edit
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tokenizer"
        shutil.copytree(sd_folder / "tokenizer", folder)
        if not (folder / name).is_file():
            (folder / name).write_text("{}")
        edited_copy(folder, Path(tmp) / "e", name, ops, how)
        out = documented(use_tokenizer, Path(tmp) / "e" / "tokenizer")
        assert isinstance(out, (list, RuntimeErrorBase))  # decoded texts, or one of our errors


@given(lines=st.lists(st.text(max_size=12), max_size=6))
@settings(max_examples=N // 2)
def test_tokenizer_merges_txt(sd_folder, lines):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tokenizer"
        shutil.copytree(sd_folder / "tokenizer", folder)
        with open(folder / "merges.txt", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        out = documented(use_tokenizer, folder)
        assert isinstance(out, (list, RuntimeErrorBase))
