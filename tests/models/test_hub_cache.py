"""Loading by hub id from a real huggingface_hub cache layout, without any network.

The cache is written in huggingface_hub's documented layout (``models--org--name/blobs/<sha>``,
``snapshots/<commit>/<file>`` symlinked to the blob, ``refs/main`` holding the commit), and
huggingface_hub's own ``scan_cache_dir`` is asked to confirm it reads it as a cached repo.
Offline mode: in-process by patching ``huggingface_hub.constants.HF_HUB_OFFLINE`` (the env var is
read once, at import), and through the real ``HF_HUB_OFFLINE=1`` env var in a subprocess.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.file_download import repo_folder_name

from runtime.models.errors import CheckpointNotFoundError
from toy_model import ToyModel, assert_state_equal, make_toy

REPO = "toy-org/toy-model"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never touch the network from these tests."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def add_snapshot(cache: Path, src: Path, commit: str, ref: str | None = "main", prefix: str = "") -> Path:
    """Put every file of ``src`` into the cache as blob + snapshot symlink; point ``ref`` at it."""
    repo = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / prefix / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture
def cache(tmp_path):
    """Two revisions of the toy model: A (seed 0, older) and B (seed 1, refs/main)."""
    cache = tmp_path / "hub"
    for commit, seed in ((COMMIT_A, 0), (COMMIT_B, 1)):
        make_toy(seed=seed).save_pretrained(tmp_path / f"src-{seed}")
        add_snapshot(cache, tmp_path / f"src-{seed}", commit)
    return cache


def test_layout_is_a_real_hub_cache(cache):
    info = huggingface_hub.scan_cache_dir(cache)
    repos = {r.repo_id: r for r in info.repos}
    assert REPO in repos
    assert {rev.commit_hash for rev in repos[REPO].revisions} == {COMMIT_A, COMMIT_B}


def test_load_by_id_from_cache_dir(cache):
    loaded = ToyModel.from_pretrained(REPO, cache_dir=cache)
    assert_state_equal(make_toy(seed=1), loaded)  # refs/main -> commit B
    assert loaded.config["_name_or_path"] == REPO


def test_local_files_only_without_offline_flag(cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert_state_equal(make_toy(seed=1), ToyModel.from_pretrained(REPO, cache_dir=cache, local_files_only=True))


def test_revision_by_commit_hash(cache):
    assert_state_equal(make_toy(seed=0), ToyModel.from_pretrained(REPO, cache_dir=cache, revision=COMMIT_A))
    assert_state_equal(make_toy(seed=1), ToyModel.from_pretrained(REPO, cache_dir=cache, revision=COMMIT_B))


def test_subfolder_and_variant_by_id(tmp_path):
    cache = tmp_path / "hub"
    model = make_toy(seed=2).half()
    model.save_pretrained(tmp_path / "src", variant="fp16")
    add_snapshot(cache, tmp_path / "src", COMMIT_A, prefix="unet")
    loaded = ToyModel.from_pretrained(REPO, subfolder="unet", variant="fp16", cache_dir=cache, dtype=torch.float16)
    assert_state_equal(model, loaded)


def test_empty_cache_names_the_id(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=REPO):
        ToyModel.from_pretrained(REPO, cache_dir=tmp_path / "empty-cache")


def test_unknown_revision_names_the_id(cache):
    with pytest.raises(CheckpointNotFoundError, match=REPO):
        ToyModel.from_pretrained(REPO, cache_dir=cache, revision="c" * 40)


def _run_offline(script: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "models")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=240)


def test_env_offline_and_hf_hub_cache_in_subprocess(cache, tmp_path):
    """The real env vars: HF_HUB_OFFLINE=1 and HF_HUB_CACHE, read by huggingface_hub at import."""
    script = f"""
        import torch
        from toy_model import ToyModel, make_toy, assert_state_equal
        from runtime.models.errors import CheckpointNotFoundError
        assert_state_equal(make_toy(seed=1), ToyModel.from_pretrained({REPO!r}))
        assert_state_equal(make_toy(seed=0), ToyModel.from_pretrained({REPO!r}, revision={COMMIT_A!r}))
        try:
            ToyModel.from_pretrained("toy-org/not-cached")
        except CheckpointNotFoundError as exc:
            assert "toy-org/not-cached" in str(exc), exc
        else:
            raise AssertionError("no error for an uncached id")
        print("ok")
    """
    result = _run_offline(script, {"HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
