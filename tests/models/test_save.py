"""save_pretrained / push_to_hub: sharding, variants, atomic replacement, tied and fused weights."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from runtime.models import ModelMixin, register_to_config, safetensors_io
from runtime.models.attention import Attention
from toy_model import ToyModel, assert_state_equal, make_toy

WEIGHTS = "diffusion_pytorch_model.safetensors"


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_single_file_with_format_metadata(tmp_path):
    make_toy().save_pretrained(tmp_path / "m")
    assert names(tmp_path / "m") == ["config.json", WEIGHTS]
    with safe_open(str(tmp_path / "m" / WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "positions" not in set(f.keys())  # non-persistent buffers are not weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sharded_round_trip(tmp_path, dtype):
    model = make_toy(width=8).to(dtype)
    model.save_pretrained(tmp_path / "m", max_shard_size=150)
    shards = [n for n in names(tmp_path / "m") if n.endswith(".safetensors")]
    count = len(shards)
    assert count > 2
    assert shards == [f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert_state_equal(model, ToyModel.from_pretrained(tmp_path / "m", dtype=dtype))


@pytest.mark.parametrize("size,expected", [(1000, 1000), ("5MB", 5_000_000), ("10GB", 10**10), ("2KiB", 2048)])
def test_parse_size(size, expected):
    assert safetensors_io.parse_size(size) == expected


def test_bad_shard_size_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="lots"):
        make_toy().save_pretrained(tmp_path / "m", max_shard_size="lots")
    assert not (tmp_path / "m").exists()


def test_variant_save_keeps_the_other_variant(tmp_path):
    model = make_toy()
    model.save_pretrained(tmp_path / "m")
    model.half().save_pretrained(tmp_path / "m", variant="fp16", max_shard_size=300)
    files = names(tmp_path / "m")
    assert WEIGHTS in files and "diffusion_pytorch_model.safetensors.index.fp16.json" in files
    assert any(n.startswith("diffusion_pytorch_model.fp16-00001-of-") for n in files)
    assert ToyModel.from_pretrained(tmp_path / "m").dtype == torch.float32
    assert_state_equal(model, ToyModel.from_pretrained(tmp_path / "m", variant="fp16", dtype=torch.float16))


def test_old_shards_do_not_linger(tmp_path):
    make_toy(seed=0).save_pretrained(tmp_path / "m", max_shard_size=300)
    (tmp_path / "m" / "README.md").write_text("mine")
    newer = make_toy(seed=1)
    newer.save_pretrained(tmp_path / "m")
    assert names(tmp_path / "m") == ["README.md", "config.json", WEIGHTS]
    assert_state_equal(newer, ToyModel.from_pretrained(tmp_path / "m"))


def test_overwrite_the_folder_it_was_loaded_from(tmp_path):
    """The loaded tensors are memory-mapped from the old files; the swap must not corrupt them."""
    make_toy(seed=0).save_pretrained(tmp_path / "m")
    loaded = ToyModel.from_pretrained(tmp_path / "m")
    loaded.save_pretrained(tmp_path / "m", max_shard_size=300)
    assert_state_equal(make_toy(seed=0), ToyModel.from_pretrained(tmp_path / "m"))
    assert_state_equal(make_toy(seed=0), loaded)


def _crash_after_first_shard(monkeypatch):
    original = safetensors_io.write_safetensors
    calls = []

    def writer(tensors, path):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(path)
        original(tensors, path)

    monkeypatch.setattr(safetensors_io, "write_safetensors", writer)


def test_crash_mid_save_leaves_no_folder(tmp_path, monkeypatch):
    _crash_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        make_toy().save_pretrained(tmp_path / "m", max_shard_size=300)
    assert names(tmp_path) == []  # neither the target nor a temporary folder


def test_crash_mid_save_keeps_the_previous_version(tmp_path, monkeypatch):
    old = make_toy(seed=0)
    old.save_pretrained(tmp_path / "m", max_shard_size=300)
    before = {n: (tmp_path / "m" / n).read_bytes() for n in names(tmp_path / "m")}
    _crash_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        make_toy(seed=1, width=10).save_pretrained(tmp_path / "m", max_shard_size=300)
    assert names(tmp_path) == ["m"]
    assert {n: (tmp_path / "m" / n).read_bytes() for n in names(tmp_path / "m")} == before
    assert_state_equal(old, ToyModel.from_pretrained(tmp_path / "m"))


class TiedModel(ModelMixin):
    """Tied weights (two names, one tensor) and a non-contiguous parameter."""

    @register_to_config
    def __init__(self, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(width, width)
        self.head = nn.Linear(width, width, bias=False)
        self.head.weight = self.embed.weight
        self.transposed = nn.Parameter(torch.randn(width + 2, width).t())


def test_tied_and_non_contiguous_tensors(tmp_path):
    model = TiedModel()
    assert not model.transposed.is_contiguous()
    model.save_pretrained(tmp_path / "m")
    loaded = TiedModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.head.weight, model.embed.weight)
    assert torch.equal(loaded.transposed, model.transposed)
    assert torch.equal(loaded.embed.weight, model.embed.weight)


class AttnModel(ModelMixin):
    @register_to_config
    def __init__(self, dim: int = 8):
        super().__init__()
        self.self_attn = Attention(dim, heads=2, dim_head=4)
        self.cross_attn = Attention(dim, cross_attention_dim=6, heads=2, dim_head=4)

    def forward(self, x, ctx):
        return self.cross_attn(self.self_attn(x), ctx)


def test_fused_projections_are_not_saved(tmp_path):
    torch.manual_seed(0)
    model = AttnModel().eval()
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 3, 6)
    expected = model(x, ctx)
    model.fuse_qkv_projections()
    assert "self_attn.to_qkv.weight" in model.state_dict()
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert not any(".to_qkv." in k or ".to_kv." in k for k in keys)
    assert model.self_attn.fused == "qkv"  # the live model stays fused
    loaded = AttnModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(x, ctx), expected, rtol=0, atol=0)


def test_not_main_process_writes_nothing(tmp_path):
    assert make_toy().save_pretrained(tmp_path / "m", is_main_process=False) is None
    assert not (tmp_path / "m").exists()


def test_pickle_serialization_sharded(tmp_path):
    model = make_toy()
    model.save_pretrained(tmp_path / "m", safe_serialization=False, max_shard_size=300)
    files = names(tmp_path / "m")
    assert "diffusion_pytorch_model.bin.index.json" in files and not any(n.endswith(".safetensors") for n in files)
    assert_state_equal(model, ToyModel.from_pretrained(tmp_path / "m"))


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    """The hub cannot be reached from tests: HfApi.create_repo/upload_folder are replaced by
    recorders, and we assert what would have been created and uploaded."""
    import huggingface_hub

    seen = {}

    def create_repo(self, repo_id, exist_ok=False, private=None, **kwargs):
        seen["create"] = dict(repo_id=repo_id, exist_ok=exist_ok, private=private, token=self.token)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, create_pr=False, repo_type=None, **kw):
        from pathlib import Path

        folder = Path(folder_path)
        seen["upload"] = dict(repo_id=repo_id, files=names(folder), message=commit_message, create_pr=create_pr,
                              repo_type=repo_type)
        seen["loaded"] = ToyModel.from_pretrained(folder, variant="fp16", dtype=torch.float16)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = make_toy().half()
    out = model.push_to_hub("me/toy", commit_message="add toy", private=True, token="hf_x", create_pr=True,
                            variant="fp16")
    assert out == "commit-info"
    assert seen["create"] == dict(repo_id="me/toy", exist_ok=True, private=True, token="hf_x")
    assert seen["upload"] == dict(repo_id="me/toy", files=["config.json", "diffusion_pytorch_model.fp16.safetensors"],
                                  message="add toy", create_pr=True, repo_type="model")
    assert_state_equal(model, seen["loaded"])


def test_save_pretrained_push_to_hub_uploads_the_target(tmp_path, monkeypatch, caplog):
    """Hub unreachable: HfApi methods replaced by recorders (see the test above)."""
    import huggingface_hub

    from types import SimpleNamespace

    seen = {}

    def create_repo(self, repo_id, **kwargs):
        seen["repo"] = repo_id
        return SimpleNamespace(repo_id=f"user/{repo_id}")  # the hub answers with the full id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        seen["upload"] = (repo_id, folder_path, names(Path(folder_path)))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    make_toy().save_pretrained(tmp_path / "toy-model", push_to_hub=True)
    assert seen == {"repo": "toy-model",
                    "upload": ("user/toy-model", str(tmp_path / "toy-model"), ["config.json", WEIGHTS])}
    with caplog.at_level(logging.WARNING):  # ignored, as diffusers ignores it, but named
        make_toy().save_pretrained(tmp_path / "x", bogus=1)
    assert "bogus" in caplog.text


def test_save_into_the_working_directory(tmp_path, monkeypatch):
    """save_pretrained(".") swaps the folder the process sits in; the process follows the new one."""
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path / "m")
    make_toy(seed=0).save_pretrained(".")
    make_toy(seed=1).save_pretrained(".")
    assert Path.cwd() == tmp_path / "m" and Path(".").resolve().exists()
    assert_state_equal(make_toy(seed=1), ToyModel.from_pretrained("."))
