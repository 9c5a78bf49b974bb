"""Measured dispatch: which implementation of an operation runs is decided by timing the candidates on
the model's own shapes at optimize time, never by what a CPU is expected to do (docs/ARCHITECTURE.md §4).

A pass that routes an operation among implementations (ours or oneDNN for a 3x3 convolution, ours or
SDPA for attention, our fused linear+GEGLU or oneDNN's linear and the activation) builds, for each
distinct call its modules will make, an ``OpKey`` (operation, shapes, dtype) and a list of
``Candidate``s, the eager one marked ``baseline``, and asks ``measure``. ``measure``:

1. takes the only candidate when there is one (nothing to time);
2. else looks the key up in the ``DispatchCache`` of this machine (CPU model name, the flags
   runtime/kernels/cpu_features.py reports, torch's thread count, the torch version and a hash of our
   kernel sources: a torch upgrade or a kernel edit is another key, so its choices are measured again);
3. else, while the session's time budget lasts, times the candidates with the session's timer
   (``wall_timer``: a warm-up round, then round-robin repetitions until each best is confirmed, the
   best) and keeps the fastest; a candidate other than the baseline must beat it by ``margin``, so
   noise never trades the eager operator for a slower one. Past the budget the baseline runs,
   unmeasured and not cached (the next optimize measures it);
4. writes what it measured to the cache (dispatch_cache.py: atomically; a read-only folder warns once
   and the choices live for the process; a corrupt file is ignored with a warning and rewritten),
   unless the timings were unsteady (another process on the cores): those decide this optimize only.

Choices take effect per module: each module's call at the representative size (``shape_probe.py``)
selects its implementation, so modules whose calls share a key share the choice, and the module keeps
it for calls at other sizes (``optimize(pipe, dispatch={"height": ..., "width": ...})`` measures at
the size you serve). Timers are injectable: tests pass fake ones (``fixed_timer``) to drive the choice.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from runtime.models.errors import OptimizationError

from .dispatch_cache import (  # noqa: F401  (the cache's names, re-exported)
    DispatchCache,
    default_cache,
    default_cache_dir,
    kernel_sources_hash,
    machine_key,
)


@dataclass(frozen=True)
class OpKey:
    """One distinct call: ``op`` ("attention", "conv3x3", ...), its shapes (nested tuples), its dtype."""

    op: str
    shape: tuple
    dtype: str

    def text(self) -> str:
        return f"{self.op} {self.shape} {self.dtype}"


@dataclass(frozen=True)
class Candidate:
    """One implementation of a call: ``run()`` makes that call once on representative inputs."""

    name: str
    run: Callable[[], Any]
    baseline: bool = False  # the eager operator: what runs when nothing is measured


@dataclass
class Measurement:
    """What ``measure`` found for one key: seconds per call by candidate (None: not timed), the choice, how."""

    key: OpKey
    times: dict[str, float | None]
    choice: str
    baseline: str
    source: str  # "measured", "cached", "only candidate", "budget spent", "forced"
    note: str = ""  # why a candidate is missing (the kernel's reason)
    modules: int = 0  # how many modules' calls have this key

    def summary(self) -> str:
        times = ", ".join(f"{n} {_ms(t)}" for n, t in self.times.items())
        text = f"{self.key.text()}: {times} -> {self.choice} ({self.source}"
        return text + (f"; {self.note})" if self.note else ")")

    def as_dict(self) -> dict:
        return {"op": self.key.op, "shape": self.key.shape, "dtype": self.key.dtype, "times_s": dict(self.times),
                "choice": self.choice, "source": self.source, "note": self.note, "modules": self.modules}


def _ms(t: float | None) -> str:
    if t is None:
        return "not timed"
    return "failed" if math.isinf(t) else f"{t * 1e3:.3g} ms"


Timer = Callable[[Sequence[Candidate]], dict[str, float]]


class Times(dict):
    """A timer's answer, seconds per call by candidate name; ``steady`` False when the repetitions disagreed
    (another process took the cores): such a measurement decides this optimize but is not cached."""

    steady = True


def wall_timer(min_rounds: int = 2, max_rounds: int = 12, long_s: float = 0.05, spread: float = 0.1,
               max_s: float = 0.6) -> Timer:
    """Time each candidate on the wall clock in rounds of one call each, round-robin so drift on a shared
    machine hits all alike. The first round is the warm-up (first-use work: packed weights, transforms) and
    only counts where nothing else does. Rounds go on, at least ``min_rounds`` and at most ``max_rounds``,
    until every candidate's best call is confirmed by a second within ``spread`` of it (a call of
    ``long_s`` or more needs none: a preemption is a small part of it), or ``max_s`` is spent; then each
    candidate's best. A candidate that raises is reported as ``inf`` (with a warning) and never chosen."""

    def timer(candidates: Sequence[Candidate]) -> Times:
        samples: dict[str, list[float]] = {c.name: [] for c in candidates}
        first: dict[str, float] = {}
        live, spent = list(candidates), 0.0

        def steady(name: str) -> bool:
            got = sorted(samples[name])
            return bool(got) and (got[0] >= long_s or (len(got) >= 2 and got[1] <= got[0] * (1 + spread)))

        for done in range(1, max(min_rounds, max_rounds) + 1):
            for c in list(live):
                try:
                    t0 = time.perf_counter()
                    c.run()
                    dt = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 (a kernel failing here must not fail optimize)
                    warnings.warn(f"dispatch: candidate {c.name!r} failed while measured ({type(e).__name__}: {e}); "
                                  "not chosen", RuntimeWarning, stacklevel=3)
                    live.remove(c)
                    continue
                spent += dt
                if done == 1:
                    first[c.name] = dt
                else:
                    samples[c.name].append(dt)
            if done >= min_rounds and (all(steady(c.name) for c in live) or spent >= max_s):
                break
        times = Times({c.name: min(samples[c.name]) if samples[c.name] else first.get(c.name, math.inf)
                       for c in candidates})
        times.steady = all(steady(c.name) for c in live)
        return times

    return timer


def fixed_timer(times: dict[str, float], default: float | None = None) -> Timer:
    """A fake timer for tests: reports ``times[name]`` (or ``default``) without running anything; its
    ``calls`` list holds the keys' candidate names it was asked about."""
    calls: list[tuple[str, ...]] = []

    def timer(candidates: Sequence[Candidate]) -> dict[str, float]:
        calls.append(tuple(c.name for c in candidates))
        return {c.name: times.get(c.name, default if default is not None else math.inf) for c in candidates}

    timer.calls = calls
    return timer


# ---- settings and the session of one optimize ----------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How ``optimize`` measures: the representative size (None: the pipeline's default), the time budget
    for measuring per optimize, the margin a non-eager candidate must win by, the timer and the cache."""

    height: int | None = None
    width: int | None = None
    budget_s: float = 5.0
    margin: float = 0.02
    refresh: bool = False  # True: time again what the cache holds, and overwrite it
    timer: Timer | None = None  # None: wall_timer()
    cache: DispatchCache | None = None  # None: default_cache()

    OPTIONS = ("height", "width", "budget_s", "margin", "refresh")  # what ``optimize(dispatch={...})`` may set


def options(value: Any) -> dict:
    """``optimize``'s ``dispatch=`` argument (None or a dict of ``Settings.OPTIONS``) checked."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OptimizationError(f"optimize: dispatch must be a dict of {', '.join(Settings.OPTIONS)}, got {value!r}")
    unknown = sorted(set(value) - set(Settings.OPTIONS))
    if unknown:
        raise OptimizationError(f"optimize: unknown dispatch option(s) {', '.join(unknown)}; "
                                f"valid: {', '.join(Settings.OPTIONS)}")
    for name, v in value.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if name == "refresh":
            if not isinstance(v, bool):
                raise OptimizationError(f"optimize: dispatch refresh must be True or False, got {v!r}")
        elif name in ("height", "width"):
            if not (v is None or (number and isinstance(v, int) and v > 0)):
                raise OptimizationError(f"optimize: dispatch {name} must be a positive int (pixels), got {v!r}")
        elif not (number and v >= 0):
            raise OptimizationError(f"optimize: dispatch {name} must be a non-negative number, got {v!r}")
    return dict(value)


_settings: contextvars.ContextVar[Settings] = contextvars.ContextVar("dispatch_settings", default=Settings())


@contextlib.contextmanager
def using(**changes):
    """Measure with these settings inside the block (a timer, a cache, a size, a budget)."""
    token = _settings.set(replace(_settings.get(), **changes))
    try:
        yield _settings.get()
    finally:
        _settings.reset(token)


@dataclass
class Session:
    """One optimize's measuring: its settings, the time spent measuring, what the shape probe found."""

    settings: Settings
    spent_s: float = 0.0
    probes: dict = field(default_factory=dict)
    seen: dict = field(default_factory=dict)  # cache entry -> how this session first got it
    timed: dict = field(default_factory=dict)  # cache entry -> what this session measured for it

    def stats(self) -> dict:
        """Seconds spent timing and how many distinct calls were timed, found in the cache, left unmeasured."""
        c = {source: 0 for source in ("measured", "cached", "budget spent")}
        for source in self.seen.values():
            c[source] += 1
        return {"seconds": round(self.spent_s, 3), **c, "budget_s": self.settings.budget_s,
                "cache": str(self.cache().directory or "in memory")}

    def describe(self) -> str:
        """One line for the report: how many calls were timed, in how long, how many came from the cache."""
        c = self.stats()
        if not (c["measured"] or c["cached"] or c["budget spent"]):
            return ""
        text = (f"timed {c['measured']} distinct calls in {self.spent_s:.1f} s (budget {self.settings.budget_s:g} s), "
                f"{c['cached']} from the cache ({self.cache().directory or 'in memory'})")
        if c["budget spent"]:
            text += (f"; {c['budget spent']} left to the eager operator unmeasured, the budget spent "
                     "(measured by the next optimize)")
        return text

    def timer(self) -> Timer:
        return self.settings.timer or wall_timer()

    def cache(self) -> DispatchCache:
        return self.settings.cache or default_cache()


_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar("dispatch_session", default=None)


@contextlib.contextmanager
def session(**changes):
    """One optimize: the passes inside share the budget and the shape probe."""
    with using(**changes) as s:
        token = _session.set(Session(s))
        try:
            yield _session.get()
        finally:
            _session.reset(token)


@contextlib.contextmanager
def ensure_session():
    """The running optimize's session, or (a pass applied on its own) one for the block."""
    if _session.get() is not None:
        yield _session.get()
    else:
        with session() as s:
            yield s


def current() -> Session:
    """The optimize session the passes run in, or a fresh one for a pass applied on its own."""
    return _session.get() or Session(_settings.get())


def networks(pipe) -> list[tuple[str, Any]]:
    """The pipeline's networks by name, the denoiser first: it runs at every step, so where the budget is
    short its calls are the ones measured."""
    from .components import DENOISERS, pipeline_models

    return sorted(pipeline_models(pipe).items(), key=lambda item: item[0] not in DENOISERS)


def probe(pipe):
    """The calls the pipeline's networks make at the session's size (shape_probe.py), probed once per
    session, and read from the cache's folder where an earlier process probed the same networks at that
    size (probe_cache.py)."""
    from . import probe_cache
    from .shape_probe import image_size, probe_calls

    s = current()
    key = (id(pipe), s.settings.height, s.settings.width)
    if key not in s.probes:
        directory = s.cache().directory
        disk_key = probe_cache.probe_key(pipe, image_size(pipe, s.settings.height, s.settings.width))
        calls = probe_cache.load(directory, disk_key)
        if calls is None:
            calls = probe_calls(pipe, s.settings.height, s.settings.width)
            probe_cache.store(directory, disk_key, calls)
        s.probes[key] = calls
        if _session.get() is None:  # no session to keep it in: nothing to reuse
            return s.probes.pop(key)
    return s.probes[key]


# ---- measuring ------------------------------------------------------------------------------------------
def measure(key: OpKey, candidates: Sequence[Candidate], *, timer: Timer | None = None,
            cache: DispatchCache | None = None, note: str = "") -> Measurement:
    """The choice among ``candidates`` for ``key`` (see the module docstring); ``timer`` and ``cache``
    default to the session's."""
    s = current()
    base = next((c for c in candidates if c.baseline), candidates[0])
    names = [c.name for c in candidates]
    if len(candidates) == 1:
        return Measurement(key, {base.name: None}, base.name, base.name, "only candidate", note)
    machine, entry = machine_key(), f"{key.text()} | {','.join(sorted(names))}"
    cache = cache or s.cache()
    if entry in s.timed:  # measured already in this optimize (another module with the same call)
        return replace(s.timed[entry], modules=0)
    hit = None if s.settings.refresh else cache.get(machine, entry)
    if hit is not None and hit["choice"] in names:
        times = {n: hit["times"].get(n) for n in names}
        s.seen.setdefault(entry, "cached")
        return Measurement(key, times, hit["choice"], base.name, "cached", note)
    if s.spent_s >= s.settings.budget_s:
        s.seen.setdefault(entry, "budget spent")
        return Measurement(key, {n: None for n in names}, base.name, base.name, "budget spent", note)
    t0 = time.perf_counter()
    with torch.inference_mode():
        answer = (timer or s.timer())(candidates)
    s.spent_s += time.perf_counter() - t0
    s.seen[entry] = "measured"
    times = {n: float(answer.get(n, math.inf)) for n in names}
    choice = pick(times, base.name, s.settings.margin)
    if getattr(answer, "steady", True):
        cache.put(machine, entry, {"times": {n: (None if math.isinf(t) else t) for n, t in times.items()},
                                   "choice": choice})
    else:
        note = "; ".join(filter(None, [note, "unsteady timings (another process on the cores?): not cached"]))
    s.timed[entry] = Measurement(key, times, choice, base.name, "measured", note)
    return replace(s.timed[entry])


def pick(times: dict[str, float | None], baseline: str, margin: float) -> str:
    """The fastest candidate; another than ``baseline`` only when it beats it by ``margin`` (a fraction)."""
    known = {n: t for n, t in times.items() if t is not None and not math.isinf(t)}
    if baseline not in known:
        return min(known, key=known.get) if known else baseline
    best = min(known, key=known.get)
    return best if best == baseline or known[best] < known[baseline] * (1.0 - margin) else baseline


def choose(measurements: Sequence[Measurement], margin: float | None = None) -> str:
    """One module's choice from the measurements of its calls: their summed times (a module called once,
    the usual case, takes its call's choice)."""
    if len(measurements) == 1:
        return measurements[0].choice
    baseline = measurements[0].baseline
    names = set.intersection(*(set(m.times) for m in measurements))
    if any(m.source != "measured" and m.source != "cached" for m in measurements):
        return baseline
    totals = {n: sum(m.times[n] if m.times[n] is not None else math.inf for m in measurements) for n in names}
    return pick(totals, baseline, current().settings.margin if margin is None else margin)


def forced(key: OpKey, name: str, baseline: str, why: str) -> Measurement:
    """The record of a choice a setting forced (nothing timed)."""
    return Measurement(key, {name: None}, name, baseline, "forced", why)


class Tally:
    """The measurements of one pass, one per key with the count of modules using it, for its report."""

    def __init__(self):
        self.by_key: dict[tuple, Measurement] = {}

    def add(self, m: Measurement) -> Measurement:
        kept = self.by_key.setdefault((m.key, tuple(sorted(m.times))), m)
        kept.modules += 1
        return kept

    def records(self) -> list[Measurement]:
        return list(self.by_key.values())

    def describe(self) -> str:
        return summarize(self.records())


def summarize(records: Sequence[Measurement]) -> str:
    """The measurements of a pass in words, for its note (empty when there are none)."""
    if not records:
        return ""
    timed = sum(m.source == "measured" for m in records)
    cached = sum(m.source == "cached" for m in records)
    head = f"measured per shape ({timed} timed, {cached} from the cache, {len(records) - timed - cached} other)"
    return head + ": " + "; ".join(m.summary() + (f" x{m.modules}" if m.modules > 1 else "") for m in records)
