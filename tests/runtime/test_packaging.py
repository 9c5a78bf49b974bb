"""One import name: the wheel holds only ``runtime``, and ours coexists with Hugging Face's ``kernels``
package (a dependency of transformers >= 5.25) from any working directory, the repository root too."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BESIDE = textwrap.dedent("""
    import json, sys
    import runtime, diffusers, transformers, kernels
    import runtime.kernels
    import torch
    torch.set_num_threads(1)
    ours = runtime.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    out = {}
    for name, p in (("ours", ours), ("theirs", theirs)):
        image = p("a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
        out[name] = image.flatten()[:8].tolist()
    print(json.dumps({"hf_kernels": kernels.__file__, "ours": runtime.kernels.__file__,
                      "unet": type(theirs.unet).__module__, "images": out,
                      "same": torch.allclose(torch.tensor(out["ours"]), torch.tensor(out["theirs"]), atol=1e-4)}))
""")


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_runtime_diffusers_and_transformers_import_beside_hugging_faces_kernels(sd_folder, tmp_path, cwd):
    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None:
        pytest.skip("Hugging Face's kernels package is not installed (transformers >= 5.25 brings it)")
    env_cwd = ROOT if cwd == "root" else tmp_path
    done = subprocess.run([sys.executable, "-c", BESIDE, str(sd_folder)], cwd=env_cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "site-packages" in seen["hf_kernels"] and not Path(seen["hf_kernels"]).is_relative_to(ROOT)
    assert Path(seen["ours"]).resolve() == ROOT / "runtime" / "kernels" / "__init__.py"
    assert seen["unet"].startswith("diffusers.")
    assert seen["same"], seen["images"]  # the two pipelines, built side by side, draw the same image


def test_the_wheel_holds_no_top_level_name_but_runtime(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__", "_prebuilt"))
    for folder in ("bench", "tests", "train", "scripts"):  # present in a checkout: must stay out of the wheel
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", str(src), "-w", str(tmp_path / "dist")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert not top_level or z.read(top_level[0]).decode().split() == ["runtime"]
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "diffusion-runtime = runtime.cli:main" in z.read(entry).decode()
    assert tops == {"runtime"}
    # what the runtime needs at run time travels with it: the kernels' C sources and the shipped model
    assert "runtime/kernels/winograd_cpu.c" in names and "runtime/kernels/cpu_math.h" in names
    assert "runtime/assets/shapes/model_index.json" in names
    # setup.py prebuilds the C kernels where it can (Linux x86-64 with a compiler): then the wheel is tagged for
    # the platform, not for a Python ABI, and its only native files are those libraries; else it stays pure
    native = [n for n in names if n.endswith(".so")]
    if wheel.name.endswith("-py3-none-any.whl"):
        assert native == []
    else:
        assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name
        assert native and all(n.startswith("runtime/kernels/_prebuilt/") for n in native), native


def test_the_runtime_never_imports_bench_or_the_reference_libraries():
    probe = ("import sys, runtime, runtime.optim, runtime.kernels, runtime.models, runtime.cli; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'bench', 'diffusers', 'transformers', 'peft', 'models', 'optim', 'kernels'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_the_bench_subcommand_says_how_to_run_the_suite(capsys):
    from runtime.cli import main

    assert main(["bench"]) == 2
    assert "python -m bench" in capsys.readouterr().err
