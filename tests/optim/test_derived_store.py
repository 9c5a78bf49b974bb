"""The derived-weight store (runtime/optim/derived_store.py): what names a source, exact round trips,
bad files, unwritable folders, the size limit, and a level-2 pipeline in a second process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from runtime.models.safetensors_io import load_safetensors, write_safetensors
from runtime.optim import derived_store as ds
from runtime.optim.snapshot import file_backing_ready

pytestmark = pytest.mark.skipif(file_backing_ready() is not None, reason=f"no file pages: {file_backing_ready()}")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    folder = tmp_path / "derived"
    monkeypatch.setenv(ds.STORE_ENV, str(folder))
    monkeypatch.delenv(ds.LIMIT_ENV, raising=False)
    monkeypatch.setattr(ds, "_sizes", {})
    monkeypatch.setattr(ds, "_warned", set())
    return folder


def checkpoint(path, seed=0, n=128 * 1024):
    g = torch.Generator().manual_seed(seed)
    write_safetensors({"w": torch.randn(n // 256, 256, generator=g), "v": torch.randn(n // 256, 256, generator=g)}, path)
    return load_safetensors(path)


def double(t):
    return lambda: (t.float() * 2).to(torch.bfloat16)


def test_a_checkpoint_tensor_has_an_origin_an_edited_or_memory_one_none(tmp_path):
    tensors = checkpoint(tmp_path / "a.safetensors")
    w, v = tensors["w"], tensors["v"]
    found = ds.origin(w)
    assert found is not None and found["dtype"] == "torch.float32" and found["shape"] == list(w.shape)
    assert abs(ds.origin(v)["offset"] - found["offset"]) == w.numel() * 4  # same file, neighbours
    again = load_safetensors(tmp_path / "a.safetensors")["w"]
    assert again.data_ptr() != w.data_ptr() and ds.origin(again) == found  # another map of the same bytes
    assert ds.origin(w.clone()) is None  # in memory
    with torch.no_grad():
        w[-1, -1] += 1  # one page written since the map
    assert ds.origin(w) is None
    assert ds.origin(v) is not None


def test_a_rewritten_file_is_another_origin(tmp_path):
    path = tmp_path / "a.safetensors"
    before = ds.origin(checkpoint(path, seed=0)["w"])
    after_rename = ds.origin(checkpoint(path, seed=1)["w"])  # written anew (another inode or mtime)
    assert before is not None and after_rename is not None and before["file"] != after_rename["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    with open(path, "r+b") as f:  # in place: same inode, new mtime
        f.seek(0)
        f.write(data)
    os.utime(path, ns=(0, after_rename["file"][3] + 10**9))
    in_place = ds.origin(load_safetensors(path)["w"])
    assert in_place["file"][1] == after_rename["file"][1] and in_place["file"] != after_rename["file"]


def test_a_copy_is_made_once_stored_exactly_and_mapped_back(tmp_path, store):
    w = checkpoint(tmp_path / "a.safetensors")["w"]
    expected = double(w)()
    made = []

    def make():
        made.append(1)
        return double(w)()

    first = ds.cached(w, "double", make, double)
    second = ds.cached(w, "double", make, double)
    assert made == [1]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert first.dtype == second.dtype == torch.bfloat16 and first.stride() == expected.stride()
    assert ds.origin(second) is not None  # on the stored file's pages: copies of it are found too
    assert len(list(store.glob("*.bin"))) == 1
    # another derivation, other parameters, another source: other keys
    ds.cached(w, "double", make, double, variant=2)
    ds.cached(w, "triple", make, double)
    assert len(made) == 3 and len(list(store.glob("*.bin"))) == 3


def test_a_copy_of_a_stored_copy_is_found_in_a_later_lookup(tmp_path):
    w = checkpoint(tmp_path / "a.safetensors")["w"]
    first = ds.cached(w, "double", double(w))
    chained = ds.cached(first, "double", double(first))
    again = ds.cached(ds.cached(w, "double", double(w)), "double", lambda: pytest.fail("made again"))
    assert torch.equal(again, chained) and torch.equal(chained, (w.float() * 4).to(torch.bfloat16))


def test_sources_without_an_origin_are_made_and_not_stored(tmp_path, store):
    w = torch.randn(512, 256)
    made = []
    out = ds.cached(w, "double", lambda: made.append(1) or double(w)())
    assert made == [1] and torch.equal(out, double(w)()) and not store.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other key"])
def test_a_bad_file_is_ignored_with_a_warning_removed_and_made_again(tmp_path, store, damage):
    w = checkpoint(tmp_path / "a.safetensors")["w"]
    ds.cached(w, "double", double(w))
    (path,) = store.glob("*.bin")
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00" * len(data))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        head = data[: ds.HEADER].rstrip(b"\0")
        header = json.loads(head[len(ds.MAGIC):])
        header["digest"] = "0" * 40
        new = ds.MAGIC + json.dumps(header).encode()
        path.write_bytes(new + bytes(ds.HEADER - len(new)) + data[ds.HEADER:])
    with pytest.warns(RuntimeWarning, match=path.name):
        out = ds.cached(w, "double", double(w))
    assert torch.equal(out, double(w)())
    assert path.read_bytes()[: len(ds.MAGIC)] == ds.MAGIC and path.stat().st_size == len(data)  # stored again


def test_an_unwritable_folder_warns_once_and_keeps_copies_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(ds.STORE_ENV, str(blocker / "derived"))
    tensors = checkpoint(tmp_path / "a.safetensors")
    with pytest.warns(RuntimeWarning, match="cannot write") as record:
        outs = [ds.cached(t, "double", double(t)) for t in tensors.values()]
    assert len([r for r in record if "cannot write" in str(r.message)]) == 1
    assert all(torch.equal(o, double(t)()) for o, t in zip(outs, tensors.values()))
    assert all(ds.origin(o) is None for o in outs)  # in memory


def test_off_stores_nothing(tmp_path, store, monkeypatch):
    monkeypatch.setenv(ds.STORE_ENV, "off")
    w = checkpoint(tmp_path / "a.safetensors")["w"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ds.cached(w, "double", double(w)), double(w)())
    assert not store.exists()


def test_the_limit_removes_the_least_recently_used_and_stale_temporary_files(tmp_path, store, monkeypatch):
    tensors = [checkpoint(tmp_path / f"{i}.safetensors", seed=i)["w"] for i in range(3)]
    one = ds.HEADER + tensors[0].numel() * 2
    monkeypatch.setenv(ds.LIMIT_ENV, str(2.5 * one / 2**30))  # room for two copies
    store.mkdir()
    stale = store / ".old.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    a = ds.cached(tensors[0], "double", double(tensors[0]))
    ds.cached(tensors[1], "double", double(tensors[1]))
    os.utime(next(iter(sorted(store.glob("*.bin"), key=lambda p: p.stat().st_atime))), (1, 1))
    ds.cached(tensors[0], "double", lambda: pytest.fail("made again"))  # a hit: now the most recent
    monkeypatch.setattr(ds, "_sizes", {})
    ds.cached(tensors[2], "double", double(tensors[2]))
    assert not stale.exists() and len(list(store.glob("*.bin"))) == 2
    assert torch.equal(ds.cached(tensors[0], "double", lambda: pytest.fail("evicted")), a)
    made = []
    ds.cached(tensors[1], "double", lambda: made.append(1) or double(tensors[1])())
    assert made == [1]  # the least recently used went


CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
import runtime
from runtime.optim import derived_store
pipe = runtime.StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
# our kernels taken without timing them: the same copies in every process, whatever the timer says
runtime.optimize(pipe, level=2, winograd={"amx": True}, geglu={"amx": True})
out = pipe("a cat", num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
           generator=torch.Generator().manual_seed(0), output_type="latent").images
torch.save(out, sys.argv[2])
print(json.dumps(derived_store.stats))
"""


def test_level_2_in_a_second_process_maps_the_copies_back_and_gives_the_same_latents(sd_folder, tmp_path, store):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))

    def run(name, **extra):
        out = tmp_path / f"{name}.pt"
        done = subprocess.run([sys.executable, "-c", CHILD, str(sd_folder), str(out)], env=dict(env, **extra),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(out)

    off, off_latents = run("off", **{ds.STORE_ENV: "off"})
    cold, cold_latents = run("cold")
    warm, warm_latents = run("warm")
    assert off["hits"] == off["stored"] == 0 and cold["stored"] > 0
    # every copy the cold process stored (or found: one it had made itself before) is found; none is made
    # again but those with no origin to key them by
    assert warm["stored"] == 0 and warm["hits"] == cold["hits"] + cold["stored"]
    assert torch.equal(cold_latents, warm_latents) and torch.equal(cold_latents, off_latents)


def test_precision_takes_stored_conversions_without_converting_and_reverts_exactly(sd_folder, store):
    import runtime
    from runtime.optim import snapshot

    def pipe():
        p = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
        return p, {k: v.clone() for k, v in p.unet.state_dict().items()}

    only_precision = dict(winograd=False, geglu=False, prepack=False, upsample=False)
    first, _ = pipe()
    at_start = ds.stats["stored"]
    runtime.optimize(first, level=2, **only_precision)
    stored = ds.stats["stored"] - at_start
    second, originals = pipe()  # another map of the same checkpoint: the same origins
    before = dict(ds.stats)
    runtime.optimize(second, level=2, **only_precision)
    # nothing with an origin converted ("made") or stored again; every such tensor found
    assert stored > 0 and ds.stats["hits"] - before["hits"] == stored
    assert ds.stats["made"] == before["made"] and ds.stats["stored"] == before["stored"]
    big = [p for p in second.unet.parameters() if p.numel() * p.element_size() >= ds.MIN_BYTES]
    assert big and all(snapshot._in_our_maps(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in big)
    a, b = first.unet.state_dict(), second.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    second.optimization.revert()
    assert all(torch.equal(v, originals[k]) and v.dtype == originals[k].dtype
               for k, v in second.unet.state_dict().items())


def test_a_full_disk_mid_write_leaves_no_partial_file_and_warns_once(tmp_path, store, monkeypatch):
    import errno

    from runtime.optim import snapshot

    tensors = checkpoint(tmp_path / "a.safetensors")
    real = snapshot._write_all
    calls = []

    def full(f, data):
        calls.append(1)
        if len(calls) > 1:  # the header went in; the bytes do not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(snapshot, "_write_all", full)
    with pytest.warns(RuntimeWarning, match="No space left") as record:
        outs = [ds.cached(t, "double", double(t)) for t in tensors.values()]
    assert len([r for r in record if "derived-weight store" in str(r.message)]) == 1
    assert all(torch.equal(o, double(t)()) for o, t in zip(outs, tensors.values()))
    assert list(store.iterdir()) == []  # no .bin, no .tmp
