"""``optimize(pipe, level=N, **overrides)``: apply a level's passes and report what happened."""
from __future__ import annotations

from . import dispatch as measured
from .base import OptimizationReport
from .check import back_off, check_options, describe
from .levels import build_plan


def optimize(pipe, level: int = 2, check=False, dispatch=None, **overrides):
    """Optimize ``pipe`` in place and return it; ``pipe.optimization`` says what was done.

    Applying again first reverts the previous optimization; ``pipe.optimization.revert()`` gives
    back the eager pipeline bit for bit. Overrides switch a pass off (``tome=False``), on
    (``tome=True``) or retune it (``deepcache={"interval": 2}``). ``check=True`` (or a dict of
    options, see check.py) measures the approximate passes against eager on one call first and
    switches off those that take the image under the PSNR floor. Where passes choose between
    implementations they time them on the pipeline's own shapes (dispatch.py): ``dispatch={"height":
    512, "width": 512}`` measures at the size you serve (default: the pipeline's), ``"budget_s"`` caps
    the seconds spent measuring, ``"refresh": True`` times again what the cache holds;
    ``pipe.optimization.dispatch`` lists the times and choices.
    """
    plan = build_plan(level, overrides)  # validate before touching the pipeline
    options = check_options(check) if check is not False and check is not None else None
    with measured.session(**measured.options(dispatch)) as session:
        _optimize(pipe, level, plan, options, overrides)
        if session.describe():
            pipe.optimization.notes["dispatch"] = session.describe()
            pipe.optimization.measuring = session.stats()
    return pipe


def _optimize(pipe, level: int, plan, options, overrides):
    previous = getattr(pipe, "optimization", None)
    if previous is not None:
        previous.revert()
    record = None
    approximate = [p.name for p in plan if not p.exact and p.supports(pipe) is None]
    if options is not None and approximate:
        overrides, record = back_off(pipe, overrides, options, approximate,
                                     lambda o: _apply(pipe, level, build_plan(level, o)))
        plan = build_plan(level, overrides)
    report = _apply(pipe, level, plan)
    if record is not None:
        report.check = record
        report.notes["check"] = describe(record)
    pipe.optimization = report
    return pipe


def _apply(pipe, level: int, plan) -> OptimizationReport:
    report = OptimizationReport(level=level, _pipe=pipe)
    try:
        for p in plan:
            reason = p.supports(pipe)
            if reason is not None:
                report.skipped[p.name] = reason
                continue
            try:
                p.apply(pipe)
            except BaseException:
                p.revert(pipe)  # what it changed before it failed: its undo log has it
                raise
            report.applied.append(p)
            if p.measurements():
                report.dispatch[p.name] = p.measurements()
            describe_pass = getattr(p, "describe", None)
            if describe_pass is not None and describe_pass():
                report.notes[p.name] = describe_pass()
    except BaseException:
        report.revert()  # never leave a half-optimized pipeline behind
        raise
    return report
