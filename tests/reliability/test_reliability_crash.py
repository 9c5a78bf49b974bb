"""Crash safety: kill -9 in the middle of save_pretrained, save_lora_weights and save_single_file, a full
disk, read-only caches.

- kill -9 a child process at each stage of a save (while writing the weights, at the swap, while
  writing model_index.json): the target then loads as the previous complete checkpoint or the new
  complete one, tensor for tensor, never a mix.
- A full disk is a real one where this process may mount a small tmpfs (root, Linux); where it
  may not, ENOSPC is simulated by making the weights' write raise ``OSError(errno.ENOSPC)``.
  Either way: an OSError naming the target, and no partial folder left behind.
- A read-only (or otherwise unusable) kernel or compile cache degrades to a warning.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runtime
from runtime.models import safetensors_io

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    import runtime
    from runtime.models import checkpoint_save, files, safetensors_io

    source, target, stage, marker = sys.argv[1:5]
    if stage.startswith("pipe"):
        obj = runtime.StableDiffusionPipeline.from_pretrained(source)
        models = [obj.unet, obj.vae, obj.text_encoder]
    else:
        obj = runtime.AutoencoderKL.from_pretrained(source)
        models = [obj]
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(1.0)  # the "new" checkpoint: every weight differs from the old one

    def stop_here():
        Path(marker).write_text("ready")
        time.sleep(60)  # the parent kills us here

    if stage.endswith("weights"):  # second weights file of the save (the first for a model)
        real, seen = safetensors_io.write_safetensors, []
        def write(tensors, path):
            seen.append(path)
            if len(seen) == (2 if stage.startswith("pipe") else 1):
                Path(path).write_bytes(b"partial")
                stop_here()
            real(tensors, path)
        safetensors_io.write_safetensors = write
    elif stage.endswith("swap"):  # just before the folder swap, everything written
        real_swap = checkpoint_save.swap_in
        def swap(tmp, target):
            if Path(target).name == Path(sys.argv[2]).name:
                stop_here()
            real_swap(tmp, target)
        checkpoint_save.swap_in = swap
    elif stage.endswith("index"):  # while writing model_index.json
        import runtime.pipelines.base as base
        real_write = base.atomic_write_text
        def write_index(path, text):
            if Path(path).name == "model_index.json":
                Path(path).write_text(text[: len(text) // 2])
                stop_here()
            real_write(path, text)
        base.atomic_write_text = write_index
    obj.save_pretrained(target)
    Path(marker).write_text("done")
""")


def _run_and_kill(source: Path, target: Path, stage: str, tmp: Path) -> str:
    marker = tmp / f"marker-{stage}"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(target), stage, str(marker)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.communicate()[0].decode()[-3000:]
        state = marker.read_text()
        if state == "ready":
            child.send_signal(signal.SIGKILL)
        child.wait(30)
        return state
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        if not any(part.startswith(".") for part in f.relative_to(folder).parts):
            out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_mid_model_save_leaves_old_or_new(sd_folder, tmp_path):
    """Killed right before the folder swap (the weights stage is the pipeline test's): old intact."""
    target = tmp_path / "vae"
    vae = runtime.AutoencoderKL.from_pretrained(sd_folder / "vae")
    vae.save_pretrained(target)
    old = _weights(target)
    assert _run_and_kill(sd_folder / "vae", target, "swap", tmp_path) == "ready"
    assert _same(_weights(target), old)  # the previous complete checkpoint, every tensor as before
    runtime.AutoencoderKL.from_pretrained(target)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".vae.saving-")]
    assert left  # the killed save's temporary folder...
    with torch.no_grad():  # a save that is not interrupted replaces it completely
        for p in vae.parameters():
            p.add_(1.0)
    vae.save_pretrained(target)
    assert not any(p.exists() for p in left)  # ...is swept by the next save to that target
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vae.")]
    new = _weights(target)
    assert new.keys() == old.keys() and not any(torch.equal(new[k], old[k]) for k in new if new[k].is_floating_point())


def test_next_save_restores_a_backup_left_between_the_two_renames_and_keeps_live_ones(sd_folder, tmp_path):
    """Where the kernel has no atomic exchange, a kill between old -> backup and new -> target leaves the
    target absent: the next save puts the backup back (the previous checkpoint) before it saves."""
    from runtime.models.checkpoint_save import sweep_stale

    target = tmp_path / "vae"
    vae = runtime.AutoencoderKL.from_pretrained(sd_folder / "vae")
    vae.save_pretrained(target)
    old = _weights(target)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    backup = tmp_path / f".vae.old-{pid}-abcd1234"
    os.rename(target, backup)  # as the kill left it
    half = tmp_path / f".vae.saving-{pid}-efgh5678"
    half.mkdir()
    live = tmp_path / f".vae.saving-{os.getpid()}-ijkl9012"  # a save of a process still running
    live.mkdir()
    assert sorted(sweep_stale(target)) == [half]
    assert _same(_weights(target), old) and not backup.exists() and live.is_dir()
    live.rmdir()


@pytest.mark.parametrize("stage", ["pipe-weights", "pipe-index"])
def test_kill_9_mid_pipeline_save_never_mixes_components(sd_folder, tmp_path, stage):
    target = tmp_path / "pipe"
    runtime.StableDiffusionPipeline.from_pretrained(sd_folder).save_pretrained(target)
    old = _weights(target)
    index = (target / "model_index.json").read_text()
    assert _run_and_kill(sd_folder, target, stage, tmp_path) == "ready"
    assert _same(_weights(target), old), "some components were replaced and others not"
    assert (target / "model_index.json").read_text() == index
    runtime.StableDiffusionPipeline.from_pretrained(target)


FILE_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import safetensors.torch
    import torch
    import runtime

    source, target, what, seed, marker = sys.argv[1:6]
    real = safetensors.torch.save_file
    def save_file(tensors, path, metadata=None):  # the new file half written, then killed
        Path(path).write_bytes(b"partial")
        Path(marker).write_text("ready")
        time.sleep(60)
    if marker != "-":
        safetensors.torch.save_file = save_file
    if what == "lora":
        g = torch.Generator().manual_seed(int(seed))
        layers = {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 32, generator=g),
                  "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(32, 4, generator=g)}
        runtime.StableDiffusionPipeline.save_lora_weights(target, unet_lora_layers=layers)
    else:
        vae = runtime.AutoencoderKL.from_pretrained(source)
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(float(seed))
        vae.save_single_file(target)
    if marker != "-":
        Path(marker).write_text("done")
""")


def _file_save(source: Path, target: Path, what: str, seed: int, marker: Path | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", FILE_CHILD, str(source), str(target), what, str(seed),
                             str(marker) if marker else "-"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("what", ["lora", "single_file"])
def test_kill_9_mid_file_save_leaves_the_previous_file_and_the_next_save_sweeps(sd_folder, tmp_path, what):
    target = tmp_path / "lora" if what == "lora" else tmp_path / "vae.safetensors"
    saved = target / "pytorch_lora_weights.safetensors" if what == "lora" else target
    first = _file_save(sd_folder / "vae", target, what, 0, None)
    assert first.wait(120) == 0, first.communicate()[0].decode()[-3000:]
    old = load_file(saved)
    marker = tmp_path / "marker"
    child = _file_save(sd_folder / "vae", target, what, 1, marker)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists() and marker.read_text() == "ready", child.communicate()[0].decode()[-3000:]
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _same(load_file(saved), old)  # the previous complete file, tensor for tensor
    left = [p for p in saved.parent.iterdir() if p.name.startswith(f".{saved.name}.saving-")]
    assert len(left) == 1 and left[0].read_bytes() == b"partial"  # the killed write's temporary file...
    again = _file_save(sd_folder / "vae", target, what, 2, None)
    assert again.wait(120) == 0, again.communicate()[0].decode()[-3000:]
    assert not left[0].exists()  # ...is swept by the next write of that target
    new = load_file(saved)
    assert new.keys() == old.keys() and not any(torch.equal(new[k], old[k]) for k in new)
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []  # nothing else hidden left


def _full_disk(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    """A folder on a 256 KiB tmpfs where this process may mount one; else ENOSPC simulated."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
        if done.returncode == 0:
            return mnt, "tmpfs"

    real = safetensors_io.write_safetensors

    def write(tensors, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(safetensors_io, "write_safetensors", write)
    del real
    return mnt, "simulated"


@pytest.mark.parametrize("what", ["model", "pipeline"])
def test_full_disk_is_a_clear_error_and_leaves_nothing(sd_folder, tmp_path, monkeypatch, what):
    mnt, how = _full_disk(tmp_path, monkeypatch)
    try:
        obj = (runtime.AutoencoderKL.from_pretrained(sd_folder / "vae") if what == "model"
               else runtime.StableDiffusionPipeline.from_pretrained(sd_folder))
        target = mnt / "out"
        with pytest.raises(OSError) as info:
            obj.save_pretrained(target)
        assert info.value.errno == errno.ENOSPC, (how, info.value)
        assert "no space left" in str(info.value) and str(target) in str(info.value)
        assert list(mnt.iterdir()) == [], f"{how}: partial files left: {list(mnt.iterdir())}"
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(mnt)], check=True)


def _unusable_dir(tmp_path: Path) -> Path:
    """A cache root under which nothing can be created, even by root: a regular file sits in the way."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    return blocker / "cache"


def test_read_only_kernel_cache_degrades_to_a_warning(tmp_path, monkeypatch):
    from runtime.kernels import cpu_build

    from runtime.kernels import cpu_sources

    runnable = [k for k in cpu_sources.kernels(Path(cpu_build.__file__).parent).values()
                if cpu_build.machine_reason(needs=k.needs) is None]
    if not runnable or not cpu_build._compiler():
        pytest.skip("no kernel this CPU runs, or no compiler: the cache is never written")
    monkeypatch.setenv("XDG_CACHE_HOME", str(_unusable_dir(tmp_path)))
    monkeypatch.setattr(cpu_build, "_fallback_dir", [])
    monkeypatch.setattr(cpu_build, "_loaded", {})
    monkeypatch.setattr(cpu_build, "prebuilt_dirs", lambda: [])  # what a JIT build meets
    with pytest.warns(RuntimeWarning, match="not writable"):
        lib, why = cpu_build.load(runnable[0].source)
    assert lib is not None, why  # built in the per-process fallback folder


def test_read_only_kernel_cache_that_holds_the_library_is_used(tmp_path, monkeypatch):
    """A warm cache on a read-only volume (a container image): loaded as is, no warning, no build."""
    from runtime.kernels import cpu_build

    if cpu_build.machine_reason(bf16=False) or not cpu_build._compiler():
        pytest.skip("no AVX-512 or no compiler: nothing to build")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "warm"))
    monkeypatch.setattr(cpu_build, "_loaded", {})
    source = Path(cpu_build.__file__).with_name("attention_f32_cpu.c")
    assert cpu_build.load(source)[0] is not None
    cache = cpu_build.kernel_cache_dir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(cache)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot bind-mount read-only here")
    try:
        monkeypatch.setattr(cpu_build, "_loaded", {})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lib, why = cpu_build.load(source)
        assert lib is not None, why
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_read_only_compile_cache_degrades_to_a_warning(sd_folder, tmp_path):
    from runtime.optim.compile import usable_cache_dir

    bad = str(_unusable_dir(tmp_path))
    with pytest.warns(RuntimeWarning, match="not writable"):
        used = usable_cache_dir(bad)
    assert used != bad and Path(used).is_dir()
    pipe = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    with pytest.warns(RuntimeWarning, match="not writable"):
        runtime.optimize(pipe, level=0, compile={"cache_dir": bad, "force": True})
    assert "compile" in str(pipe.optimization)
    pipe.optimization.revert()


def _level2_latents(folder, store: str):
    from runtime.optim import derived_store

    before = dict(derived_store.stats)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(derived_store.STORE_ENV, store)
        mp.setattr(derived_store, "_sizes", {})
        mp.setattr(derived_store, "_warned", set())
        pipe = runtime.StableDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        runtime.optimize(pipe, level=2)
        out = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    return out, {k: derived_store.stats[k] - before[k] for k in before}


def test_unusable_derived_weight_store_degrades_to_a_warning(sd_folder, tmp_path):
    reference, _ = _level2_latents(sd_folder, "off")
    with pytest.warns(RuntimeWarning, match="derived-weight store: cannot write"):
        out, counts = _level2_latents(sd_folder, str(_unusable_dir(tmp_path)))
    assert counts["stored"] == counts["hits"] == 0 and torch.equal(out, reference)


def test_read_only_derived_weight_store_that_holds_the_copies_is_used(sd_folder, tmp_path):
    """A warm store on a read-only volume: every copy found, no warning, the same latents."""
    store = tmp_path / "derived"
    reference, cold = _level2_latents(sd_folder, str(store))
    if not cold["stored"]:
        pytest.skip("nothing stored: no weight here lies on file pages")
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(store)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot bind-mount read-only here")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out, warm = _level2_latents(sd_folder, str(store))
    finally:
        import gc

        gc.collect()  # the pipeline's copies map files of the mount
        if subprocess.run(["umount", str(store)]).returncode:
            subprocess.run(["umount", "-l", str(store)], check=True)
    assert warm["stored"] == 0 and warm["hits"] >= cold["stored"] and torch.equal(out, reference)
