"""Every bad checkpoint gets a clear error of the right class that names the file, key or shape."""
from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
from safetensors.torch import save_file

from runtime.models.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    MissingWeightsError,
    ShapeMismatchError,
    UnsafeCheckpointError,
)
from toy_model import ToyModel, assert_state_equal, make_toy

WEIGHTS = "diffusion_pytorch_model.safetensors"
LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a2146b3bd0f4b1f3e8f1c4b0c5a1f0a7c3e1f2b6d9e8f7a6b5c4d3e2f1a0b\nsize 3438167534\n"
)


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "ckpt"
    make_toy().save_pretrained(path)
    return path


def test_truncated_safetensors(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as info:
        ToyModel.from_pretrained(folder)
    assert WEIGHTS in str(info.value)


def test_file_shorter_than_length_field(folder):
    (folder / WEIGHTS).write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}.*truncated"):
        ToyModel.from_pretrained(folder)


def test_header_claims_more_bytes_than_the_file_has(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    with pytest.raises(CheckpointError, match="header claims") as info:
        ToyModel.from_pretrained(folder)
    assert WEIGHTS in str(info.value)


def test_header_not_json(folder):
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}.*not valid JSON"):
        ToyModel.from_pretrained(folder)


@pytest.mark.parametrize("name", [WEIGHTS, "diffusion_pytorch_model.bin"])
def test_git_lfs_pointer(folder, name):
    (folder / WEIGHTS).unlink()
    (folder / name).write_text(LFS_POINTER)
    with pytest.raises(CheckpointError, match="LFS pointer") as info:
        ToyModel.from_pretrained(folder)
    assert name in str(info.value) and "git lfs pull" in str(info.value)


def test_index_pointing_to_missing_shard(tmp_path):
    make_toy().save_pretrained(tmp_path / "m", max_shard_size=200)
    shards = sorted((tmp_path / "m").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        ToyModel.from_pretrained(tmp_path / "m")
    assert shards[-1].name in str(info.value) and "index.json" in str(info.value)


def test_index_invalid_json(tmp_path):
    make_toy().save_pretrained(tmp_path / "m", max_shard_size=200)
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json.*not valid JSON"):
        ToyModel.from_pretrained(tmp_path / "m")


def test_invalid_config_json(folder):
    (folder / "config.json").write_text('{"width": }')
    with pytest.raises(ConfigError, match="config.json"):
        ToyModel.from_pretrained(folder)


def test_unknown_class_name(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["_class_name"] = "AutoencoderKL"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="AutoencoderKL") as info:
        ToyModel.from_pretrained(folder)
    assert "config.json" in str(info.value)


def test_subclass_and_base_class_names_are_accepted(folder):
    from toy_model import HookedToyModel

    hooked = HookedToyModel.from_pretrained(folder)  # config says ToyModel: a base class of HookedToyModel
    assert type(hooked) is HookedToyModel
    raw = json.loads((folder / "config.json").read_text())
    raw["_class_name"] = "HookedToyModel"
    (folder / "config.json").write_text(json.dumps(raw))
    base = ToyModel.from_pretrained(folder)  # a subclass's checkpoint
    assert type(base) is ToyModel
    assert base.state_dict().keys() == hooked.state_dict().keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in hooked.state_dict().items())


def _spy_torch_load(monkeypatch):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_safetensors_wins_over_pickle(folder, monkeypatch):
    """A .bin beside the safetensors file is never opened (it would fail loudly if it were)."""
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle at all")
    calls = _spy_torch_load(monkeypatch)
    ToyModel.from_pretrained(folder)
    assert calls == []


def test_pickle_only_loads_with_weights_only(tmp_path, monkeypatch):
    model = make_toy()
    model.save_pretrained(tmp_path / "m", safe_serialization=False)
    assert (tmp_path / "m" / "diffusion_pytorch_model.bin").is_file()
    calls = _spy_torch_load(monkeypatch)
    assert_state_equal(model, ToyModel.from_pretrained(tmp_path / "m"))
    assert calls and all(c.get("weights_only") is True for c in calls)


def test_use_safetensors_false_reads_the_pickle(folder):
    other = make_toy(seed=1)
    torch.save(other.state_dict(), folder / "diffusion_pytorch_model.bin")
    assert_state_equal(other, ToyModel.from_pretrained(folder, use_safetensors=False))
    assert not torch.equal(ToyModel.from_pretrained(folder).proj.weight, other.proj.weight)


def test_use_safetensors_true_with_only_a_pickle(tmp_path):
    make_toy().save_pretrained(tmp_path / "m", safe_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="diffusion_pytorch_model.bin"):
        ToyModel.from_pretrained(tmp_path / "m", use_safetensors=True)


class Payload:
    """Something only an unsafe unpickle could rebuild."""


def test_pickle_with_objects_is_refused(tmp_path):
    make_toy().save_pretrained(tmp_path / "m", safe_serialization=False)
    state = dict(make_toy().state_dict())
    state["evil"] = Payload()
    torch.save(state, tmp_path / "m" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="diffusion_pytorch_model.bin"):
        ToyModel.from_pretrained(tmp_path / "m")


def test_truncated_pickle(tmp_path):
    make_toy().save_pretrained(tmp_path / "m", safe_serialization=False)
    path = tmp_path / "m" / "diffusion_pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin"):
        ToyModel.from_pretrained(tmp_path / "m")


def test_missing_weights_names_keys(folder):
    state = dict(make_toy().state_dict())
    del state["proj.weight"], state["block.0.bias"]
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(MissingWeightsError) as info:
        ToyModel.from_pretrained(folder)
    assert "proj.weight" in str(info.value) and "block.0.bias" in str(info.value) and "2 key(s)" in str(info.value)


def test_many_missing_weights_are_counted(folder):
    model = make_toy()
    model.save_pretrained(folder)
    save_file({"unrelated": torch.zeros(1)}, str(folder / WEIGHTS))
    total = len(model.state_dict())
    with pytest.raises(MissingWeightsError, match=f"{total} key\\(s\\)"):
        ToyModel.from_pretrained(folder)


def test_unexpected_keys_warn(folder, caplog):
    state = dict(make_toy().state_dict())
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / WEIGHTS))
    with caplog.at_level(logging.WARNING):
        ToyModel.from_pretrained(folder)
    assert any("extra.weight" in r.getMessage() and WEIGHTS in r.getMessage() for r in caplog.records)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    make_toy(width=6).save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["channels"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ShapeMismatchError) as info:
        ToyModel.from_pretrained(tmp_path / "m")
    text = str(info.value)
    assert "block.0.weight" in text and "[4, 4, 3, 3]" in text and "[3, 3, 3, 3]" in text


def test_missing_variant_names_the_file(folder):
    with pytest.raises(CheckpointNotFoundError) as info:
        ToyModel.from_pretrained(folder, variant="fp16")
    assert "diffusion_pytorch_model.fp16.safetensors" in str(info.value) and "fp16" in str(info.value)


def test_no_weights_and_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    make_toy().save_config(tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError, match="diffusion_pytorch_model.safetensors"):
        ToyModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointNotFoundError, match="does-not-exist"):
        ToyModel.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointNotFoundError, match="nosuch"):
        ToyModel.from_pretrained(tmp_path / "empty", subfolder="nosuch")


def test_header_shape_disagrees_with_offsets(folder):
    """The reader's own validation (shape x dtype vs. byte span) surfaces as ours, naming the file."""
    data = (folder / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["proj.weight"]["shape"] = [3, 3]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (length - len(raw))
    (folder / WEIGHTS).write_bytes(data[:8] + raw + data[8 + length :])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}.*unreadable"):
        ToyModel.from_pretrained(folder)


def test_index_may_not_point_outside_its_folder(tmp_path):
    make_toy().save_pretrained(tmp_path / "m", max_shard_size=200)
    index = tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["proj.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="elsewhere.safetensors"):
        ToyModel.from_pretrained(tmp_path / "m")
