"""The whole-pipeline comparison: every configuration on the same weights, warmed up, alternated, with parity.

Timing runs in this process, round-robin over the configurations per repetition (the start
rotating each time) so that machine drift hits all alike; the medians are reported. Configurations
that share a pipeline are applied and reverted around each run, so each of their timed runs follows an
untimed short call (``REWARM_STEPS``): what is timed is a served pipeline's steady state, and the first
call after applying is reported apart (``first_call_s``). Peak RSS and compile times come from fresh
processes (bench/probe.py), one configuration each.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .ceiling import limit_figures, matmul_peaks, unet_step_flops
from .configs import BASELINE, OURS_EAGER, ConfigSkipped, ConfigSpec, Loader, Prepared
from .machine import REPO
from .timing import generate, initial_latents


@dataclass(frozen=True)
class BenchSettings:
    """Everything a run depends on; written into every row."""
    folder: str
    model: str
    height: int
    width: int
    steps: int = 10
    guidance_scale: float = 7.5
    prompt: str = "a red circle on a blue background"
    seed: int = 0
    warmup: int = 1
    runs: int = 5
    threads: int = 0  # 0: torch's default
    probe: bool = True
    score: bool = False
    matmul_runs: int = 5
    work_dir: str = ""

    def call(self) -> dict:
        return {"prompt": self.prompt, "height": self.height, "width": self.width,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ConfigSkipped) else f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _parity(image: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    """(max-abs, PSNR dB) of an image against a reference; PSNR is None when they are identical."""
    if reference is None or image.shape != reference.shape:
        return None, None
    from runtime.optim.parity import max_abs, psnr

    value = psnr(image, reference)
    return max_abs(image, reference), (None if math.isinf(value) else round(value, 2))


def _adherence(image: np.ndarray, prompt: str) -> float | None:
    try:
        from PIL import Image

        from runtime.shapes import score
    except ImportError:
        return None
    pil = Image.fromarray((np.clip(image[0], 0, 1) * 255).round().astype(np.uint8))
    try:
        return float(score(pil, prompt)["overall"])
    except ValueError as exc:  # a prompt the shapes grammar cannot parse: no adherence, said why
        _log(f"adherence not scored: {_reason(exc)}")
        return None


def _probe(settings: BenchSettings, spec: ConfigSpec, cache_dir: str | None) -> dict:
    """Run bench/probe.py in a fresh process; its JSON, or {"error": ...}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # diffusers' torch.compile reads inductor's own setting
    cmd = [sys.executable, "-m", "bench.probe", "--folder", settings.folder, "--spec", json.dumps(asdict(spec)),
           "--call", json.dumps(settings.call()), "--seed", str(settings.seed), "--threads", str(settings.threads)]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        return {"error": "probe timed out after 1200 s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"probe exited {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def _probe_figures(settings: BenchSettings, spec: ConfigSpec, compiles: bool) -> dict:
    """Peak RSS, first-call overhead, and for compiling configurations compile time cold and warm."""
    slug = "".join(c if c.isalnum() else "-" for c in spec.name)
    cache = Path(settings.work_dir) / "inductor-cache" / slug if compiles else None
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
    first = _probe(settings, spec, str(cache) if cache else None)
    if "error" in first:
        return {"probe_error": first["error"]}
    figures = {"peak_rss_mib": round(first["peak_rss_mib"], 1), "load_s": round(first["load_and_setup_s"], 3),
               "import_s": round(first["import_s"], 3),
               "first_call_overhead_s": round(first["first_call_s"] - first["second_call_s"], 3),
               "compile_cold_s": None, "compile_warm_s": None}
    if cache is not None:
        figures["compile_cold_s"] = round(first["first_call_s"] - first["second_call_s"], 3)
        warm = _probe(settings, spec, str(cache))
        if "error" in warm:
            figures["probe_error"] = "warm: " + warm["error"]
        else:
            figures["compile_warm_s"] = round(warm["first_call_s"] - warm["second_call_s"], 3)
            figures["peak_rss_warm_mib"] = round(warm["peak_rss_mib"], 1)
    return figures


def _step_flops(loader: Loader, settings: BenchSettings) -> int | None:
    """FLOPs of one UNet call of our eager model at this size and guidance batch (the same for diffusers')."""
    try:
        pipe = loader.shared("ours")
    except Exception:  # noqa: BLE001 - fall back to the reference implementation's identical UNet
        pipe = loader.shared("diffusers")
    unet = pipe.unet
    batch = 2 if settings.guidance_scale > 1 else 1
    sample = initial_latents(pipe, batch, settings.height, settings.width, settings.seed)
    context = torch.zeros(batch, 77, unet.config.cross_attention_dim)
    return unet_step_flops(unet, sample, torch.tensor(500), context)


# Steps of the untimed call before each timed run of a configuration applied around its runs: enough for
# every path of level 3's defaults (whole guided calls, DeepCache's reuse, whole unguided calls after TGATE's
# gate), so the timed run sees what a served pipeline sees after its first call (first_call_s has that cost).
REWARM_STEPS = 4


def _run_config(prepared: Prepared, call: dict, latents: torch.Tensor, timed: bool = True):
    prepared.enter()
    try:
        if timed and prepared.rewarm:
            generate(prepared.pipe, dict(call, num_inference_steps=min(REWARM_STEPS, call["num_inference_steps"])),
                     latents)
        return generate(prepared.pipe, call, latents)
    finally:
        prepared.exit()


def run_benchmark(settings: BenchSettings, specs: list[ConfigSpec]) -> list[dict]:
    """Time every configuration; returns one row (a dict) per configuration, in the order given."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    rows = {s.name: {"config": s.name, "spec": s, "status": "ok", "reason": None, "figures": {}, "parity": {}}
            for s in specs}
    _log(f"matmul peaks (2048x2048, best of {settings.matmul_runs})")
    peaks = matmul_peaks(runs=settings.matmul_runs)
    loader = Loader(settings.folder, compile_cache=str(Path(settings.work_dir) / "inductor-cache" / "main"),
                    size=(settings.height, settings.width))
    prepared: dict[str, Prepared] = {}
    for spec in specs:
        _log(f"set up {spec.name}")
        try:
            prepared[spec.name] = loader.prepare(spec)
            setup = prepared[spec.name].report() or {}
            if "export_s" in setup:  # what converting the user's checkpoint cost, before any image
                rows[spec.name]["figures"].update(export_s=setup["export_s"], ov_compile_s=setup["ov_compile_s"])
        except Exception as exc:  # noqa: BLE001 - a configuration that cannot run is a row, not a crash
            rows[spec.name].update(status="skipped", reason=_reason(exc))
    if not prepared:
        return _finish(rows, settings, peaks, None)
    call = settings.call()
    latents = initial_latents(next(iter(prepared.values())).pipe, 1, settings.height, settings.width, settings.seed)

    def fail(name: str, exc: BaseException) -> None:
        _log(f"{name} failed: {_reason(exc)}\n{traceback.format_exc(limit=3)}")
        rows[name].update(status="error", reason=_reason(exc))
        prepared.pop(name, None)

    for name in list(prepared):  # warm-up, one configuration at a time (compiles happen here)
        _log(f"warm-up {name}")
        for i in range(settings.warmup):
            try:
                _, seconds, _ = _run_config(prepared[name], call, latents, timed=False)
            except Exception as exc:  # noqa: BLE001
                fail(name, exc)
                break
            if i == 0:
                rows[name]["figures"]["first_call_s"] = round(seconds, 4)
    samples = {name: {"e2e": [], "step": [], "calls": 0, "image": None} for name in prepared}
    for rep in range(settings.runs):  # alternated: round-robin, start rotating
        names = list(prepared)
        order = names[rep % max(len(names), 1):] + names[:rep % max(len(names), 1)]
        _log(f"repetition {rep + 1}/{settings.runs}")
        for name in order:
            try:
                image, seconds, unet_calls = _run_config(prepared[name], call, latents)
            except Exception as exc:  # noqa: BLE001
                fail(name, exc)
                continue
            s = samples[name]
            s["e2e"].append(seconds)
            s["step"].append(sum(unet_calls) / max(len(unet_calls), 1))
            s["calls"], s["image"] = len(unet_calls), image
    for name, p in prepared.items():
        rows[name]["optimization"] = p.report()
        s = samples[name]
        if not s["e2e"]:
            rows[name].update(status="error", reason=rows[name]["reason"] or "no timed runs")
            continue
        rows[name]["figures"].update(
            end_to_end_s=round(statistics.median(s["e2e"]), 4), end_to_end_runs_s=[round(x, 4) for x in s["e2e"]],
            unet_step_s=round(statistics.median(s["step"]), 5), unet_calls=s["calls"])
        rows[name]["_image"] = s["image"]
    step_flops = None
    try:
        step_flops = _step_flops(loader, settings)
    except Exception as exc:  # noqa: BLE001
        _log(f"FLOP count failed: {_reason(exc)}")
    prepared.clear()  # free every pipeline before the probes start their own processes
    loader.release()
    if settings.probe:
        for spec in specs:
            if rows[spec.name]["status"] == "ok":
                # a level whose plan skipped the compile pass (level 3 on CPU) has no compile time to probe
                skipped = (rows[spec.name].get("optimization") or {}).get("skipped", {})
                compiles = spec.compiles and "compile" not in skipped
                _log(f"probe {spec.name} (fresh process{', cold + warm compile' if compiles else ''})")
                rows[spec.name]["figures"].update(_probe_figures(settings, spec, compiles))
    return _finish(rows, settings, peaks, step_flops)


def _finish(rows: dict, settings: BenchSettings, peaks: dict, step_flops: int | None) -> list[dict]:
    """Ratios against diffusers eager, parity against both eager images, the limit, and the row layout."""
    base = rows.get(BASELINE, {}).get("figures", {})
    ref_images = {key: rows.get(key, {}).get("_image") for key in (OURS_EAGER, BASELINE)}
    out = []
    for name, row in rows.items():
        spec: ConfigSpec = row.pop("spec")
        image = row.pop("_image", None)
        fig = row["figures"]
        if row["status"] == "ok":
            for key, ratio in (("end_to_end_s", "speedup_vs_diffusers_eager"),
                               ("unet_step_s", "unet_speedup_vs_diffusers_eager")):
                fig[ratio] = round(base[key] / fig[key], 3) if base.get(key) and fig.get(key) else None
            fig["unet_step_gflop"] = round(step_flops / 1e9, 3) if step_flops else None
            fig.update(limit_figures(step_flops, fig.get("unet_step_s"), peaks))
            for key, label in ((OURS_EAGER, "ours_eager"), (BASELINE, "diffusers_eager")):
                mx, db = _parity(image, ref_images[key]) if image is not None else (None, None)
                row["parity"][f"max_abs_vs_{label}"] = mx
                row["parity"][f"psnr_vs_{label}_db"] = db
            row["parity"]["adherence"] = _adherence(image, settings.prompt) if settings.score and image is not None else None
        row.update(impl=spec.impl, kind=spec.kind, compiles=spec.compiles,
                   settings={**asdict(spec)["settings"], **{k: v for k, v in asdict(settings).items() if k != "work_dir"}},
                   matmul_peaks=peaks)
        out.append(row)
    return out
