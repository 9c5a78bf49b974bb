"""The configurations the pipeline benchmark compares, and how each one is set up on a loaded pipeline.

Configurations that change a pipeline reversibly (tomesd, DeepCache, our passes without compile)
share one loaded pipeline and apply themselves around each run (``enter``/``exit``, untimed); the
ones that compile own their pipeline, since compiled code is expensive to rebuild.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

OUR_PASSES = ("attention", "fused_qkv", "geglu", "group_norm", "upsample", "memory_format", "precision", "prepack", "winograd", "tome", "tgate", "deepcache", "compile")
BASELINE, OURS_EAGER = "diffusers-eager", "ours-eager"


class ConfigSkipped(RuntimeError):
    """The configuration does not apply here (a pass skipped itself); the message says why."""


@dataclass(frozen=True)
class ConfigSpec:
    """One row of the comparison: who runs it and with which settings."""
    name: str
    impl: str  # "diffusers" | "ours" | "openvino"
    kind: str  # "eager" | "compile" | "tomesd" | "deepcache" | "level" | "pass" | "export"
    settings: dict = field(default_factory=dict)

    @property
    def compiles(self) -> bool:
        """Whether this configuration runs torch.compile (it then owns its pipeline)."""
        if self.kind == "compile":
            return True
        if self.impl != "ours" or self.kind not in ("level", "pass"):
            return False
        overrides = self.settings.get("overrides", {})
        if "compile" in overrides:
            return bool(overrides["compile"])
        return self.kind == "level" and self.settings["level"] >= 2


def all_specs(no_compile: bool = False) -> list[ConfigSpec]:
    """The full set: the peers, our eager pipeline, each level, each pass alone."""
    off = {"compile": False} if no_compile else {}
    specs = [
        ConfigSpec(BASELINE, "diffusers", "eager"),
        ConfigSpec("diffusers-compile", "diffusers", "compile", {"target": "unet", "torch.compile": {}}),
        ConfigSpec("diffusers-deepcache", "diffusers", "deepcache", {"cache_interval": 3, "cache_branch_id": 0}),
        ConfigSpec("diffusers-tomesd", "diffusers", "tomesd", {"ratio": 0.5}),
        # OpenVINO through optimum-intel: exported from the same folder, static shapes. "default" lets it
        # pick its precision (bf16 on CPUs with AVX512-BF16); f32 forces full precision.
        ConfigSpec("openvino", "openvino", "export", {"precision": "default"}),
        ConfigSpec("openvino-f32", "openvino", "export", {"precision": "f32"}),
        ConfigSpec(OURS_EAGER, "ours", "eager"),
    ]
    for level in range(4):
        suffix = " (compile=False)" if off and level >= 2 else ""
        specs.append(ConfigSpec(f"ours-L{level}{suffix}", "ours", "level", {"level": level, "overrides": dict(off)}))
    for name in OUR_PASSES:
        on = {"force": True} if name == "compile" else True  # compile on CPU only runs forced (compile.py)
        specs.append(ConfigSpec(f"ours-{name}", "ours", "pass", {"level": 0, "overrides": {name: on}}))
    # Our DeepCache at the deepcache package's settings (every 3rd step whole from the first step on),
    # for a like-for-like row beside diffusers-deepcache; our default also runs the first quarter whole.
    specs.append(ConfigSpec("ours-deepcache-i3", "ours", "pass",
                            {"level": 0, "overrides": {"deepcache": {"interval": 3, "start": 0}}}))
    return specs


def quick_specs() -> list[ConfigSpec]:
    """--quick: the baselines, level 1, and level 3 without compile."""
    return [
        ConfigSpec(BASELINE, "diffusers", "eager"),
        ConfigSpec(OURS_EAGER, "ours", "eager"),
        ConfigSpec("ours-L1", "ours", "level", {"level": 1, "overrides": {}}),
        ConfigSpec("ours-L3 (compile=False)", "ours", "level", {"level": 3, "overrides": {"compile": False}}),
    ]


def select(specs: list[ConfigSpec], names: list[str] | None, no_compile: bool) -> list[ConfigSpec]:
    """Keep the named configurations (always with both baselines); with no_compile drop compiling ones."""
    if names:
        unknown = [n for n in names if n not in {s.name for s in specs}]
        if unknown:
            raise SystemExit(f"bench: unknown configuration(s) {unknown}; known: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in names or s.name in (BASELINE, OURS_EAGER)]
    return specs


@dataclass
class Prepared:
    """A configuration ready to run: its pipeline and what to do around each run."""
    spec: ConfigSpec
    pipe: object
    enter: Callable[[], None] = lambda: None
    exit: Callable[[], None] = lambda: None
    report: Callable[[], dict | None] = lambda: None
    # Applied around each run (enter/exit on a shared pipeline): its one-time costs (packed and transformed
    # weights made on first use) come back each run, so each timed run is preceded by an untimed short call.
    rewarm: bool = False


class Loader:
    """Loads each implementation's pipeline once from the folder; configurations share or copy it."""

    def __init__(self, folder: str, compile_cache: str | None = None, size: tuple[int, int] | None = None):
        self.folder = folder
        self.compile_cache = compile_cache
        self.size = size  # (height, width) of the run: peers with static shapes compile for it
        self._shared: dict[str, object] = {}

    def load(self, impl: str):
        if impl == "diffusers":
            import diffusers

            pipe = diffusers.StableDiffusionPipeline.from_pretrained(self.folder, safety_checker=None,
                                                                     requires_safety_checker=False)
        else:
            import runtime

            pipe = runtime.StableDiffusionPipeline.from_pretrained(self.folder)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def shared(self, impl: str):
        if impl not in self._shared:
            self._shared[impl] = self.load(impl)
        return self._shared[impl]

    def release(self) -> None:
        self._shared.clear()

    def prepare(self, spec: ConfigSpec) -> Prepared:
        """Set a configuration up; raises (ImportError, RuntimeError, ...) where it cannot run."""
        if spec.impl == "diffusers":
            return self._prepare_diffusers(spec)
        if spec.impl == "openvino":
            from .openvino_peer import prepare_openvino

            height, width = self.size or (None, None)
            return prepare_openvino(self.folder, spec, height=height, width=width)
        return self._prepare_ours(spec)

    def _prepare_diffusers(self, spec: ConfigSpec) -> Prepared:
        base = self.shared("diffusers")
        if spec.kind == "eager":
            return Prepared(spec, base)
        if spec.kind == "compile":
            import diffusers
            import torch

            unet = torch.compile(copy.deepcopy(base.unet))  # its own UNet: compiled state never leaks into eager
            pipe = diffusers.StableDiffusionPipeline(**{**base.components, "unet": unet})
            pipe.set_progress_bar_config(disable=True)
            return Prepared(spec, pipe)
        if spec.kind == "tomesd":
            import tomesd

            return Prepared(spec, base, enter=lambda: tomesd.apply_patch(base, **spec.settings),
                            exit=lambda: tomesd.remove_patch(base), rewarm=True)
        if spec.kind == "deepcache":
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=base)
            helper.set_params(**spec.settings)
            return Prepared(spec, base, enter=helper.enable, exit=helper.disable, rewarm=True)
        raise ValueError(f"unknown diffusers configuration kind {spec.kind!r}")

    def _overrides(self, spec: ConfigSpec) -> dict:
        overrides = dict(spec.settings.get("overrides", {}))
        if spec.compiles and self.compile_cache:
            compile_settings = overrides.get("compile")
            compile_settings = compile_settings if isinstance(compile_settings, dict) else {}
            overrides["compile"] = {**compile_settings, "cache_dir": self.compile_cache}
        return overrides

    def _prepare_ours(self, spec: ConfigSpec) -> Prepared:
        if spec.kind == "eager":
            return Prepared(spec, self.shared("ours"))
        try:
            from runtime import optimize
        except ImportError:
            from runtime.optim import optimize
        level, overrides = spec.settings["level"], self._overrides(spec)
        if spec.compiles:  # its own pipeline, optimized once
            pipe = self.load("ours")
            optimize(pipe, level=level, **overrides)
            return Prepared(spec, pipe, report=lambda: pipe.optimization.as_dict())
        base = self.shared("ours")
        optimize(base, level=level, **overrides)  # fail here, at set-up, if it cannot apply
        report = base.optimization.as_dict()
        base.optimization.revert()
        del base.optimization
        if not report["applied"] and spec.kind == "pass":
            raise ConfigSkipped(f"pass not applied: {report['skipped'].get(next(iter(spec.settings['overrides'])), '?')}")

        def enter():
            optimize(base, level=level, **overrides)

        def exit_():
            base.optimization.revert()
            del base.optimization

        return Prepared(spec, base, enter=enter, exit=exit_, report=lambda: report, rewarm=True)
