"""Where a tensor snapshot keeps the originals a conversion replaced (runtime/optim/snapshot.py): left
to their memory-mapped checkpoint file, spilled to a nameless file, or in memory; and that every way
back is bit for bit, including after edits, a checkpoint changed on disk and a spill folder that
cannot be written. What is held is counted (``where()``, and the pages themselves), never timed."""
from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
import warnings

import pytest
import torch
from torch import nn

import runtime
from runtime import optim
from runtime.models.safetensors_io import load_safetensors, write_safetensors
from runtime.optim import snapshot as snap_mod
from runtime.optim.snapshot import SPILL_ENV, SPILL_MIN_BYTES, TensorSnapshot, file_backing_ready
from runtime.optim.undo import RevertError, UndoLog, entry

from pipeline_fixtures import quiet_pipeline

needs_file_backing = pytest.mark.skipif(file_backing_ready() is not None,
                                        reason=f"originals left to their files: {file_backing_ready()}")
PAGE = mmap.PAGESIZE


class Net(nn.Module):
    """Two weights of several pages each, a float buffer of 64 KiB, and tensors smaller than a page."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)  # 256 KiB weight
        self.b = nn.Conv2d(64, 64, 3, padding=1)  # 144 KiB weight
        self.small = nn.Linear(4, 4)
        self.register_buffer("scale", torch.linspace(0, 1, SPILL_MIN_BYTES // 4))
        self.register_buffer("steps", torch.arange(8))  # not floating: .to(dtype) keeps it


def saved_net(path) -> Net:
    torch.manual_seed(0)
    write_safetensors(Net().state_dict(), path)
    return loaded_net(path)


def loaded_net(path) -> Net:
    """A Net whose tensors are the file's memory map, as from_pretrained leaves them."""
    net = Net()
    net.load_state_dict(load_safetensors(path), assign=True)
    return net


def state(module) -> dict:
    """Every tensor by name: (bytes, dtype, shape, strides, address, Parameter identity)."""
    out = {}
    for name, p in module.named_parameters():
        out[name] = (p.detach().clone(), p.dtype, p.shape, p.stride(), p.data_ptr(), id(p))
    for name, b in module.named_buffers():
        out[name] = (b.clone(), b.dtype, b.shape, b.stride(), b.data_ptr(), None)
    return out


def same_values(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x[1:4] == y[1:4] and torch.equal(x[0].reshape(-1).view(torch.uint8), y[0].reshape(-1).view(torch.uint8))
        for x, y in ((a[k], b[k]) for k in a))


def addresses(s: dict) -> dict:
    return {k: v[4] for k, v in s.items()}


def resident_pages(t: torch.Tensor) -> int:
    """How many of the whole pages inside ``t`` are in memory (/proc/self/pagemap, bit 63)."""
    start = -(-t.data_ptr() // PAGE) * PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
    if end <= start:
        return 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        data = os.pread(fd, 8 * ((end - start) // PAGE), 8 * (start // PAGE))
    finally:
        os.close(fd)
    flags = torch.frombuffer(bytearray(data), dtype=torch.int64)
    return int((flags < 0).sum())  # bit 63 is the sign bit


def to_bf16(log: UndoLog, net: nn.Module) -> TensorSnapshot:
    return log.tensors(net, lambda: net.to(torch.bfloat16))


@pytest.fixture(autouse=True)
def spill_folder(tmp_path, monkeypatch):
    folder = tmp_path / "spill"
    monkeypatch.setenv(SPILL_ENV, str(folder))
    return folder


# ---- left to the checkpoint file ------------------------------------------------------------------
@needs_file_backing
def test_originals_left_to_their_file_are_not_held_and_come_back_bit_for_bit(tmp_path):
    net = saved_net(tmp_path / "w.safetensors")
    for t in net.state_dict().values():
        t.sum()  # in memory, as after a call
    before = state(net)
    originals = {"a": net.a.weight.data, "b": net.b.weight.data, "scale": net.scale}
    assert all(resident_pages(t) > 0 for t in originals.values())
    log = UndoLog("test")
    snapshot = to_bf16(log, net)
    assert net.a.weight.dtype == torch.bfloat16
    where = snapshot.where()
    big = sum(t.numel() * t.element_size() for t in originals.values())
    # what the snapshot still holds in memory: the tensors smaller than a page, nothing more
    small = 4 * (4 * 4 + 4 + 256 + 64)
    assert where["memory"] <= small + 3 * 2 * PAGE and where["spill"] == 0  # and the partial pages at their ends
    assert where["file"] >= big - 3 * 2 * PAGE
    assert all(resident_pages(t) == 0 for t in originals.values())  # their pages went back to the file
    assert where["module"] == 8 * 8  # the int64 buffer the conversion kept
    # the bf16 weights the module now holds are on pages of a nameless file, not in memory until read
    assert snapshot.on_file_pages == (256 * 256 + 64 * 64 * 9) * 2
    assert resident_pages(net.a.weight) == 0
    assert torch.equal(net.a.weight.float(), before["a.weight"][0].bfloat16().float())
    log.replay()
    after = state(net)
    assert same_values(after, before)
    assert addresses(after) == addresses(before)  # the very tensors, read again from the file


@needs_file_backing
def test_pages_edited_after_load_stay_in_memory_and_come_back_as_edited(tmp_path):
    net = saved_net(tmp_path / "w.safetensors")
    with torch.no_grad():
        net.a.weight[128, 0] += 1.0  # the version counter moves
        net.scale[0] = 7.0  # on the partial page at its start: that page is never given back
    net.b.weight.data[32, 0, 0, 0] = 5.0  # through .data: the version counter does not move
    before = state(net)
    originals = {"a": net.a.weight.data, "b": net.b.weight.data}
    log = UndoLog("test")
    where = to_bf16(log, net).where()
    # the one written page of each stays (a private copy: the file does not have it), the rest goes back
    assert {k: resident_pages(t) for k, t in originals.items()} == {"a": 1, "b": 1}
    assert where["spill"] == 0 and where["memory"] >= 2 * PAGE
    log.replay()
    assert same_values(state(net), before)
    assert net.b.weight[32, 0, 0, 0].item() == 5.0 and net.scale[0].item() == 7.0


@needs_file_backing
def test_checkpoint_replaced_on_disk_before_optimize_is_not_read(tmp_path):
    path = tmp_path / "w.safetensors"
    net = saved_net(path)
    before = state(net)
    torch.manual_seed(1)
    write_safetensors(Net().state_dict(), tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", path)  # the path now names other weights
    log = UndoLog("test")
    where = to_bf16(log, net).where()
    assert where["file"] == 0 and where["spill"] > 0
    log.replay()
    assert same_values(state(net), before)


@needs_file_backing
def test_checkpoint_replaced_after_optimize_still_restores_bit_for_bit(tmp_path):
    path = tmp_path / "w.safetensors"
    net = saved_net(path)
    before = state(net)
    log = UndoLog("test")
    assert to_bf16(log, net).where()["file"] > 0
    torch.manual_seed(1)
    write_safetensors(Net().state_dict(), tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", path)  # the map and the open file still hold the old one
    os.remove(path)
    log.replay()
    after = state(net)
    assert same_values(after, before) and addresses(after) == addresses(before)


@needs_file_backing
def test_checkpoint_rewritten_in_place_after_optimize_is_an_error_not_other_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    net = saved_net(path)
    log = UndoLog("test")
    to_bf16(log, net)
    st = os.stat(path)
    with open(path, "r+b") as f:  # same file, new bytes: what the pages would be read back as
        f.seek(st.st_size - 4096)
        f.write(os.urandom(4096))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(RevertError, match="rewritten in place"):
        log.replay()
    assert net.a.weight.dtype == torch.bfloat16 and net.scale.dtype == torch.bfloat16  # nothing restored
    assert len(log) == 1  # the entry stays for a later try


# ---- the converted weights, on file pages ----------------------------------------------------------
@needs_file_backing
def test_a_weight_whose_copy_serves_gives_its_clean_pages_back_and_keeps_its_values():
    net = built_net()
    log = UndoLog("test")
    assert to_bf16(log, net).on_file_pages > 0
    w = net.a.weight
    expected = w.detach().clone()
    w.detach().sum()  # read: its pages come in from the file
    assert resident_pages(w) == (256 * 256 * 2) // PAGE
    with torch.no_grad():
        w[200, 0] = 3.0  # one page written: a private copy
    expected[200, 0] = 3.0
    assert served_bytes(w) == 256 * 256 * 2 - PAGE
    assert resident_pages(w) == 1 and torch.equal(w.detach(), expected)  # read again from the file
    assert served_bytes(net.small.weight) == 0 and served_bytes(torch.randn(1 << 16)) == 0  # not on file pages
    log.replay()
    assert net.a.weight.dtype == torch.float32


@needs_file_backing
def test_a_second_conversion_leaves_the_first_ones_tensors_to_their_file_pages():
    net = built_net()
    before = state(net)
    first, second = UndoLog("precision"), UndoLog("memory_format")
    to_bf16(first, net)
    converted = state(net)
    where = second.tensors(net, lambda: net.to(memory_format=torch.contiguous_format)).where()
    # the conv's bf16 weight (the one 4-D tensor: the rest stays the module's), left to its file pages
    assert where["file"] == 64 * 64 * 9 * 2 and where["spill"] == 0 and where["module"] >= 256 * 256 * 2
    second.replay()
    assert same_values(state(net), converted) and addresses(state(net)) == addresses(converted)
    first.replay()
    assert same_values(state(net), before)


def served_bytes(t: torch.Tensor) -> int:
    return snap_mod.give_back(t)


@needs_file_backing
def test_derived_copies_made_hand_their_source_pages_back(pipe):
    from runtime.optim.prepack import onednn_bf16

    if not onednn_bf16():
        pytest.skip("oneDNN has no bf16 path on this CPU: nothing is packed")
    optim.optimize(pipe, level=0, precision={"dtype": "bfloat16"}, prepack=True)
    run_once(pipe)
    packed = [(f"{name}.{n}", m) for name, model in optim.components.pipeline_models(pipe).items()
              for n, m in model.named_modules()
              if getattr(entry(m, "prepack"), "packed_cache", None) and on_file_pages(m.weight)]
    assert packed  # the tiny UNet's larger convolutions
    # given back when packed; reading a neighbour later maps a few of their pages again (the kernel's
    # fault-around maps up to 64 KiB of pages already cached around a fault), so count them all together
    pages = sum(m.weight.numel() * m.weight.element_size() // PAGE for _, m in packed)
    assert sum(resident_pages(m.weight) for _, m in packed) <= 0.25 * pages


def on_file_pages(t: torch.Tensor) -> bool:
    lo = t.data_ptr()
    return any(s <= lo < e and ref() is not None for s, e, ref in snap_mod._our_maps)


def run_once(pipe):
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")


# ---- spilled, or kept in memory -------------------------------------------------------------------
def built_net() -> Net:
    """A Net made in memory (no file behind its tensors), channels_last like a converted UNet."""
    torch.manual_seed(0)
    return Net().to(memory_format=torch.channels_last)


def test_tensors_without_a_file_are_spilled_and_read_back_bit_for_bit(spill_folder):
    net = built_net()
    before = state(net)
    log = UndoLog("test")
    where = to_bf16(log, net).where()
    spilled = sum(before[k][0].numel() * 4 for k in ("a.weight", "b.weight", "scale"))
    assert where["spill"] == spilled and where["file"] == 0
    assert where["memory"] < SPILL_MIN_BYTES  # only the small ones
    assert list(spill_folder.iterdir()) == []  # the spill file has no name
    log.replay()
    after = state(net)
    assert same_values(after, before)  # values, dtypes, shapes and strides (channels_last) too
    assert after["b.weight"][3] == before["b.weight"][3]
    assert net.b.weight.is_contiguous(memory_format=torch.channels_last)
    assert {k: v[5] for k, v in after.items()} == {k: v[5] for k, v in before.items()}  # same Parameters


def test_unwritable_spill_folder_keeps_them_in_memory_with_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(SPILL_ENV, str(blocker / "spill"))
    net = built_net()
    before = state(net)
    log = UndoLog("test")
    with pytest.warns(RuntimeWarning, match="could not spill"):
        where = to_bf16(log, net).where()
    assert where["spill"] == 0 and where["memory"] >= before["a.weight"][0].numel() * 4
    log.replay()
    after = state(net)
    assert same_values(after, before) and addresses(after) == addresses(before)


def test_full_disk_while_spilling_keeps_them_in_memory_with_a_warning(monkeypatch):
    def full(f, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(snap_mod, "_write_all", full)
    net = built_net()
    before = state(net)
    log = UndoLog("test")
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert to_bf16(log, net).where()["spill"] == 0
    log.replay()
    assert same_values(state(net), before) and addresses(state(net)) == addresses(before)


def test_spilling_off_or_on_a_memory_file_system_keeps_them_in_memory_quietly(monkeypatch):
    folders = ["off"]
    if os.path.isdir("/dev/shm") and snap_mod._memory_filesystem("/dev/shm"):
        shm = tempfile.mkdtemp(dir="/dev/shm", prefix="diffusion-runtime-test-")
        folders.append(os.path.join(shm, "spill"))
    try:
        for folder in folders:
            spilled, restored = _kept_quietly(folder, monkeypatch)
            assert spilled == 0 and restored, folder
    finally:
        if len(folders) > 1:
            shutil.rmtree(os.path.dirname(folders[1]), ignore_errors=True)


def _kept_quietly(folder, monkeypatch) -> tuple[int, bool]:
    """With ``folder`` as the spill setting, a bf16 conversion's originals: bytes spilled (warnings are errors
    here), and whether the revert gave the values back."""
    monkeypatch.setenv(SPILL_ENV, folder)
    net = built_net()
    before = state(net)
    log = UndoLog("test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spilled = to_bf16(log, net).where()["spill"]
    log.replay()
    return spilled, same_values(state(net), before)


def test_without_convert_the_originals_stay_in_memory_as_before():
    net = built_net()
    log = UndoLog("test")
    snapshot = log.tensors(net)
    net.to(torch.bfloat16)
    assert snapshot.where()["spill"] == 0 and snapshot.where()["file"] == 0
    log.replay()
    assert net.a.weight.dtype == torch.float32


# ---- through optimize --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(sd_folder, one_thread):
    return quiet_pipeline(runtime.StableDiffusionPipeline, sd_folder)


@needs_file_backing
def test_precision_leaves_the_fp32_originals_to_the_checkpoint_and_reverts_bit_for_bit(pipe):
    models = optim.components.pipeline_models(pipe)
    before = {name: state(m) for name, m in models.items()}
    optim.optimize(pipe, level=0, precision={"dtype": "bfloat16"}, fused_qkv=True)
    (precision,) = [p for p in pipe.optimization.applied if p.name == "precision"]
    held = {k: sum(s.where()[k] for s in precision.log().snapshots()) for k in ("module", "memory", "file", "spill")}
    assert held["file"] > 0
    # in memory: only tensors smaller than a page or the spill threshold, a small share of the fp32 weights
    assert held["memory"] < 0.25 * (held["file"] + held["spill"] + held["memory"]), held
    pipe.optimization.revert()
    for name, m in models.items():
        after = state(m)
        assert same_values(after, before[name]) and addresses(after) == addresses(before[name])


def test_held_reads_back_only_the_parameters_asked_for(spill_folder):
    """fuse_lora asks every live snapshot for its own model's originals: another model's spilled ones
    must stay spilled (read back, they would sit in memory until that model's revert)."""
    from runtime.optim.snapshot import _Spilled

    net = built_net()
    before = state(net)
    log = UndoLog("test")
    snap = to_bf16(log, net)
    spilled = [p for p, data in snap.params if isinstance(data, _Spilled)]
    ids = [id(p) for p in spilled]
    assert len(spilled) >= 2
    assert snap.held({id(torch.nn.Parameter(torch.zeros(1)))}) == {}  # another model's parameter: nothing
    assert all(isinstance(data, _Spilled) for p, data in snap.params if id(p) in ids)
    one = snap.held({id(spilled[0])})
    assert list(one) == [id(spilled[0])] and isinstance(one[id(spilled[0])], torch.Tensor)
    assert [isinstance(data, _Spilled) for p, data in snap.params if id(p) in ids] == [False] + [True] * (len(ids) - 1)
    log.replay()
    assert same_values(state(net), before)
