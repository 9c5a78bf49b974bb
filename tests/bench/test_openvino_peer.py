"""The OpenVINO peer of the benchmark: a clear skip where optimum-intel is missing; where it is installed
(a separate venv, bench/openvino_peer.py), the exported pipeline draws what diffusers draws from the same
folder and latents (f32), at the benchmark's static shape."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from bench.configs import ConfigSkipped, ConfigSpec, Loader, all_specs

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("optimum") is not None


def test_openvino_rows_are_in_the_full_set():
    names = {s.name: s for s in all_specs()}
    assert names["openvino"].impl == "openvino" and names["openvino-f32"].settings == {"precision": "f32"}
    assert not names["openvino"].compiles  # its own export/compile is timed at set-up, not by inductor probes


@pytest.mark.skipif(HAVE_OPENVINO, reason="optimum-intel is installed: the skip path does not apply")
def test_missing_openvino_is_a_skip_that_says_what_to_install(tmp_path):
    with pytest.raises(ConfigSkipped, match="optimum-intel"):
        Loader(str(tmp_path)).prepare(ConfigSpec("openvino", "openvino", "export", {"precision": "default"}))


def test_unknown_precision_is_named(tmp_path):
    from bench.openvino_peer import prepare_openvino

    with pytest.raises(ValueError, match="fp8"):
        prepare_openvino(str(tmp_path), ConfigSpec("openvino", "openvino", "export", {"precision": "fp8"}))


@pytest.mark.skipif(not HAVE_OPENVINO, reason="optimum-intel with openvino is not installed (bench/openvino_peer.py)")
def test_openvino_f32_draws_what_diffusers_draws(tmp_path):
    pytest.importorskip("diffusers")
    from bench.make_checkpoint import build_checkpoint
    from bench.timing import generate, initial_latents

    folder = str(build_checkpoint("tiny", tmp_path / "tiny", seed=0))
    loader = Loader(folder, size=(64, 64))
    ov = loader.prepare(ConfigSpec("openvino-f32", "openvino", "export", {"precision": "f32"}))
    ref = loader.prepare(ConfigSpec("diffusers-eager", "diffusers", "eager"))
    call = {"prompt": "a red circle on a blue background", "height": 64, "width": 64,
            "num_inference_steps": 3, "guidance_scale": 7.5}
    latents = initial_latents(ref.pipe, 1, 64, 64, seed=0)
    ov_image, _, ov_calls = generate(ov.pipe, call, latents)
    ref_image, _, ref_calls = generate(ref.pipe, call, latents)
    assert ov_image.shape == ref_image.shape and len(ov_calls) == len(ref_calls) >= 3  # PNDM adds a warm-up call
    assert np.abs(ov_image - ref_image).max() < 2e-2, np.abs(ov_image - ref_image).max()
    assert ov.report()["export_s"] > 0 and ov.report()["static_shape"] == [1, 64, 64]
