"""The OpenVINO peer (optimum-intel): the same diffusers folder exported to OpenVINO's format, reshaped
to the benchmark's static shape and compiled for the CPU.

OpenVINO cannot run from the checkpoint as it is: optimum-intel first exports every model (traced
through torch) into its own IR, then compiles it for one batch size and resolution. Both costs are
recorded in the row (``export_s``, ``ov_compile_s``), since a user pays them. Its dependencies pin
transformers and diffusers versions of their own, so it is meant to live in a separate virtual
environment that sees the system's packages:

    python3 -m venv --system-site-packages ~/.venvs/ov
    ~/.venvs/ov/bin/pip install -c <(echo torch==2.13.0) "optimum-intel[openvino]"
    ~/.venvs/ov/bin/python -m bench --model small --configs openvino,openvino-f32 ...

Where it is not installed the rows say so (skipped) and the rest of the run goes on.
"""
from __future__ import annotations

import time

from .configs import ConfigSkipped, ConfigSpec, Prepared

PRECISION_HINTS = {"default": None, "f32": "f32", "bf16": "bf16"}


def _pipeline_class():
    try:
        from optimum.intel import OVStableDiffusionPipeline
    except ImportError as exc:
        raise ConfigSkipped(
            f"openvino peer: optimum-intel with openvino is not importable here ({exc}); install "
            "'optimum-intel[openvino]' in a venv with --system-site-packages (bench/openvino_peer.py)") from exc
    return OVStableDiffusionPipeline


def prepare_openvino(folder: str, spec: ConfigSpec, batch: int = 1, height: int | None = None,
                     width: int | None = None) -> Prepared:
    """Export ``folder``, fix the shapes, compile; the export and compile seconds go into the row's report."""
    if spec.settings.get("precision") not in PRECISION_HINTS:
        raise ValueError(f"openvino precision {spec.settings.get('precision')!r}; one of {sorted(PRECISION_HINTS)}")
    cls = _pipeline_class()
    hint = PRECISION_HINTS[spec.settings["precision"]]
    ov_config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
    start = time.perf_counter()
    pipe = cls.from_pretrained(folder, export=True, compile=False, ov_config=ov_config)
    export_s = time.perf_counter() - start
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the model's default, as diffusers
    height, width = height or side, width or side
    start = time.perf_counter()
    pipe.reshape(batch_size=batch, height=height, width=width, num_images_per_prompt=1)
    pipe.compile()
    compile_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    report = {"export_s": round(export_s, 2), "ov_compile_s": round(compile_s, 2),
              "ov_config": ov_config, "static_shape": [batch, height, width]}
    return Prepared(spec, pipe, report=lambda: report)
