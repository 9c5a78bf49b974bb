"""The command line: generate writes a PNG and reports stage times; info lists components; errors are one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest


import runtime

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_generate_writes_the_pipeline_image_and_stage_times(sd_folder, tmp_path):
    out = tmp_path / "x.png"
    result = cli("generate", str(sd_folder), "--prompt", "a red circle", "--steps", "3", "--seed", "5",
                 "--scheduler", "EulerDiscreteScheduler", "--output", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    for stage in ("load", "text encode", "denoise", "decode"):
        assert stage in result.stdout
    pipe = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.scheduler = runtime.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    import torch

    want = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(want))


def test_info_lists_components(sd_folder):
    result = cli("info", str(sd_folder))
    assert result.returncode == 0, result.stderr
    assert "StableDiffusionPipeline" in result.stdout
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "UNet2DConditionModel", "F32", "parameters"):
        assert name in result.stdout


def test_missing_folder_exits_nonzero_with_one_line_and_no_traceback(tmp_path):
    result = cli("generate", "/no/such/folder", "--prompt", "x", "--output", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["diffusion-runtime generate: error: checkpoint folder not found: /no/such/folder"]


@pytest.mark.parametrize(
    "args,message",
    [
        (("info", "/no/such/folder"), "/no/such/folder"),
        (("generate", "--prompt", "x"), "no model given"),
        (("generate", "{sd}", "--prompt", "x", "--height", "15", "--steps", "1"), "height=15"),
        (("generate", "{sd}", "--prompt", "x", "--scheduler", "Nope"), "unknown scheduler 'Nope'"),
        (("generate", "{sd}", "--prompt", "x", "--steps", "0"), "num_inference_steps"),
        (("generate", "{sd}", "--prompt", "x", "--output", "/no/dir/x.png"), "/no/dir does not exist"),
    ],
    ids=["info-missing-folder", "no-model", "bad-size", "bad-scheduler", "zero-steps", "bad-output"],
)
def test_user_mistakes_are_one_line(sd_folder, tmp_path, capsys, monkeypatch, args, message):
    import runtime.cli
    from runtime.cli import main

    monkeypatch.setattr(runtime.cli, "SHIPPED_MODEL", tmp_path / "not-installed")  # "no model" needs no shipped one
    args = [a.replace("{sd}", str(sd_folder)) for a in args]
    if args[0] == "generate" and "--output" not in args:
        args += ["--output", str(tmp_path / "o.png"), "--quiet"]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines


def test_generate_without_a_model_uses_the_shipped_one(tmp_path, capsys):
    from runtime.cli import default_model, main

    if default_model() is None:
        pytest.skip("no shipped model in runtime/assets/shapes")
    out = tmp_path / "o.png"
    assert main(["generate", "--prompt", "a large red circle on a blue background, in the centre", "--steps", "4",
                 "--output", str(out), "--quiet"]) == 0
    from PIL import Image

    from runtime.shapes import score

    image = Image.open(out)
    assert image.size == (64, 64)
    assert score(image, "a large red circle on a blue background, in the centre")["background"]


def test_compare_runs_each_level_on_one_pipeline_and_writes_a_strip(sd_folder, tmp_path):
    """Level 0 is the eager pipeline (the same image as generate); level 1 is exact, so the PSNR
    column says so; the strip holds both images side by side."""
    out = tmp_path / "levels.png"
    result = cli("compare", str(sd_folder), "--prompt", "a red circle on a blue background", "--levels", "0", "1",
                 "--steps", "2", "--threads", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [r[0] for r in rows] == ["0", "1"]
    assert "reference" in rows[0]
    strip = np.asarray(PIL.Image.open(out))
    pipe = runtime.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    import torch

    want = np.asarray(pipe("a red circle on a blue background", num_inference_steps=2, guidance_scale=7.5,
                           generator=torch.Generator().manual_seed(0)).images[0])
    h, w = want.shape[:2]
    assert strip.shape == (h, 2 * w + 4, 3)
    assert np.array_equal(strip[:, :w], want)
    level1 = strip[:, w + 4:].astype(int)
    assert np.abs(level1 - want).max() <= 2  # exact class: at most a rounding step apart
