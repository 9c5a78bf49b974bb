"""The pass protocol and the report ``optimize`` leaves on a pipeline (docs/ARCHITECTURE.md §4).

A pass is a small object: ``name``, ``exact``, ``supports(pipe) -> reason | None``,
``apply(pipe)`` (keeps what it replaced on itself) and ``revert(pipe)`` (restores it exactly).
Its settings are the fields of a frozen dataclass, so overrides are validated by field name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from runtime.models.errors import OptimizationError

from .undo import RevertError, UndoLog


@dataclass(frozen=True)
class Pass:
    """Base class: subclasses are frozen dataclasses whose fields are their settings."""

    name: ClassVar[str] = "pass"
    exact: ClassVar[bool] = True

    def supports(self, pipe) -> str | None:
        return None

    def apply(self, pipe) -> None:
        raise NotImplementedError

    def revert(self, pipe) -> None:
        """Replay this pass's undo log backwards (undo.py); no pass writes its own restore code."""
        try:
            self.log().replay()
        finally:
            self.__dict__.pop("_saved", None)

    # ---- settings --------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def with_settings(cls, settings: dict[str, Any]) -> "Pass":
        unknown = sorted(set(settings) - set(cls.setting_names()))
        if unknown:
            valid = ", ".join(cls.setting_names()) or "(none)"
            raise OptimizationError(f"pass {cls.name!r}: unknown settings {', '.join(unknown)}; valid: {valid}")
        return cls(**settings)

    def measurements(self) -> list:
        """What measured dispatch timed and chose while applying (dispatch.Measurement records; none by default)."""
        return list(self._state().get("measurements", []))

    def log(self) -> UndoLog:
        """Where ``apply`` records every change it makes (undo.py)."""
        log = self.__dict__.get("_undo")
        if log is None:
            log = UndoLog(f"pass {self.name!r}")
            object.__setattr__(self, "_undo", log)
        return log

    def _state(self) -> dict:
        """Per-instance mutable storage for what apply() replaced (the dataclass is frozen)."""
        state = self.__dict__.get("_saved")
        if state is None:
            state = {}
            object.__setattr__(self, "_saved", state)
        return state


@dataclass
class OptimizationReport:
    """What ``optimize`` did to a pipeline: applied passes with settings, skipped ones with why."""

    level: int
    applied: list[Pass] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    check: dict | None = None  # what optimize(check=...) measured and switched off (check.py)
    # pass name -> what measured dispatch timed and chose, per distinct call (dispatch.py)
    dispatch: dict[str, list] = field(default_factory=dict)
    measuring: dict = field(default_factory=dict)  # seconds spent timing, distinct calls timed / cached / unmeasured
    _pipe: Any = field(default=None, repr=False)

    def revert(self) -> None:
        """Undo every applied pass, last first; the pipeline is the eager one again, bit for bit."""
        pipe = self._pipe
        failed: list[tuple[str, BaseException]] = []
        while self.applied:
            p = self.applied.pop()
            try:
                p.revert(pipe)
            except RevertError as err:  # go on with the other passes, then say what is left
                failed += [(f"{p.name}: {what}", e) for what, e in err.failed]
        if failed:
            raise RevertError("optimization revert", failed)
        if pipe is not None and getattr(pipe, "optimization", None) is self:
            pipe.optimization = None

    def as_dict(self) -> dict:
        return {
            "level": self.level,
            "applied": {p.name: p.settings() for p in self.applied},
            "skipped": dict(self.skipped),
            "notes": dict(self.notes),
            "dispatch": {name: [m.as_dict() for m in records] for name, records in self.dispatch.items()},
            "measuring": dict(self.measuring),
            **({"check": self.check} if self.check is not None else {}),
        }

    def __str__(self) -> str:
        lines = [f"optimization level {self.level}"]
        for p in self.applied:
            settings = ", ".join(f"{k}={v}" for k, v in p.settings().items())
            note = self.notes.get(p.name)
            lines.append(f"  applied {p.name}({settings})" + (f": {note}" if note else ""))
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        if "check" in self.notes:
            lines.append(f"  {self.notes['check']}")
        return "\n".join(lines)
