"""``optimize(pipe, level=N, **overrides)``: apply a level's passes and report what happened."""
from __future__ import annotations

from .base import OptimizationReport
from .levels import build_plan


def optimize(pipe, level: int = 2, **overrides):
    """Optimize ``pipe`` in place and return it; ``pipe.optimization`` says what was done.

    Applying again first reverts the previous optimization; ``pipe.optimization.revert()`` gives
    back the eager pipeline bit for bit. Overrides switch a pass off (``tome=False``), on
    (``tome=True``) or retune it (``deepcache={"interval": 2}``).
    """
    plan = build_plan(level, overrides)  # validate before touching the pipeline
    previous = getattr(pipe, "optimization", None)
    if previous is not None:
        previous.revert()
    report = OptimizationReport(level=level, _pipe=pipe)
    try:
        for p in plan:
            reason = p.supports(pipe)
            if reason is not None:
                report.skipped[p.name] = reason
                continue
            p.apply(pipe)
            report.applied.append(p)
            describe = getattr(p, "describe", None)
            if describe is not None and describe():
                report.notes[p.name] = describe()
    except BaseException:
        report.revert()  # never leave a half-optimized pipeline behind
        raise
    pipe.optimization = report
    return pipe
