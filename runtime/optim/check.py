"""The parity check behind ``optimize(pipe, level=3, check=True)``: measure, then back off.

The approximate passes' defaults were chosen from measured quality, but how much a model tolerates
depends on the model, the step count and the size (on the shipped shapes model, TGATE gated at half
the steps without its guidance drop turns colours wrong; measured: bench/RESULTS.md, 'Shipped shapes
model: adherence and parity per level and pass (2026-12-01)', and 'Figures moved from docstrings').
The check measures closeness
to eager: TGATE's guidance drop draws a different image by design (cleaner, on the shipped model), so
under the default floor it is usually the first pass switched off. With ``check`` the plan is measured before it is
kept: one call of the eager pipeline and one of the plan (without compile, which is near-exact
and slow to build) on the same prompt and seed; while the decoded image's PSNR against eager is
under ``floor_db``, the approximate passes are switched off one at a time, the one that buys the
least speed for its error first (``BACK_OFF``), and measured again. The report says what was
measured and what was switched off.

Pass the prompt, step count and size you will serve: ``check={"prompt": ..., "num_inference_steps":
20, "height": 512, "width": 512}``. Keys other than ``floor_db`` and ``seed`` go to the pipeline call.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from runtime.models.errors import OptimizationError

from .parity import psnr

# Switched off in this order until the image is within the floor: TGATE first (a modest gain alone,
# measured: bench/RESULTS.md, 'Figures moved from docstrings'; and with its guidance drop the
# furthest from eager), ToMe next, DeepCache (the largest gain) last.
BACK_OFF = ("tgate", "tome", "deepcache")
DEFAULTS = {"floor_db": 30.0, "seed": 0, "prompt": "a red circle on a blue background, in the centre",
            "num_inference_steps": 20}


def check_options(check: Any) -> dict:
    """``True`` or a dict of options -> the full options; anything else is an error naming it."""
    if check is True:
        return dict(DEFAULTS)
    if isinstance(check, dict):
        options = {**DEFAULTS, **check}
        floor = options["floor_db"]
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or floor <= 0:
            raise OptimizationError(f"optimize: check floor_db must be a positive number of dB, got {floor!r}")
        return options
    raise OptimizationError(f"optimize: check must be True, False or a dict of options, got {check!r}")


def _call(pipe, options: dict):
    kwargs = {k: v for k, v in options.items() if k not in ("floor_db", "seed")}
    params = inspect.signature(pipe.__call__).parameters
    if "prompt" not in params:  # unconditional pipelines
        kwargs.pop("prompt", None)
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise OptimizationError(f"optimize: check options {', '.join(unknown)} are not arguments of "
                                f"{type(pipe).__name__}.__call__")
    generator = torch.Generator().manual_seed(int(options["seed"]))
    return pipe(**kwargs, generator=generator, output_type="np").images


def back_off(pipe, overrides: dict, options: dict, approximate: list[str],
             measure_with: Callable[[dict], Any]) -> tuple[dict, dict]:
    """The overrides that keep the plan within ``floor_db``, and a record of what was measured.

    ``measure_with(overrides)`` applies the plan with those overrides (compile off) and returns the
    report to revert; the pipeline is eager again when this returns.
    """
    reference = _call(pipe, options)
    record = {"floor_db": float(options["floor_db"]), "measured": [], "switched_off": []}
    current = dict(overrides)
    order = [n for n in BACK_OFF if n in approximate] + [n for n in approximate if n not in BACK_OFF]
    while True:
        report = measure_with({**current, "compile": False})
        try:
            db = psnr(_call(pipe, options), reference)
        finally:
            report.revert()
        active = [n for n in order if n not in record["switched_off"]]
        record["measured"].append({"passes": active, "psnr_db": round(db, 2)})
        if db >= options["floor_db"] or not active:
            record["psnr_db"] = round(db, 2)
            return current, record
        record["switched_off"].append(active[0])
        current[active[0]] = False


def describe(record: dict) -> str:
    """One line for the report."""
    if not record["switched_off"]:
        return f"parity check passed: {record['psnr_db']} dB >= {record['floor_db']} dB against eager"
    steps = "; ".join(f"{'+'.join(m['passes']) or 'no approximate pass'}: {m['psnr_db']} dB" for m in record["measured"])
    return (f"parity check switched off {', '.join(record['switched_off'])} to stay within "
            f"{record['floor_db']} dB of eager ({steps})")
