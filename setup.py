"""The wheel's one build step beyond pyproject.toml (where all the metadata lives): compile the C kernels
into runtime/kernels/_prebuilt, so an installed package's first call loads them instead of running the
compiler (runtime/kernels/cpu_build.py looks there first, read only).

Never a reason for a build to fail: off Linux x86-64, without a C compiler, with one too old for
AVX512-BF16, or with ``DIFFUSION_RUNTIME_PREBUILD=0``, the wheel is built without them (pure, as before) and
the kernels compile on first use, as they always did. With them the wheel holds native code and is tagged
``py3-none-<platform>`` (no Python ABI: the libraries are plain C loaded with ctypes). Editable installs
(``pip install -e``) build nothing here: ``python -m runtime.kernels.build`` fills the cache instead
(scripts/setup.sh). The host's CPU does not matter for the build; at run time each library is loaded only
where the CPU has what its header says it needs.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # pragma: no cover - older setuptools: no prebuilt kernels, a pure wheel
    bdist_wheel = None

ENV = "DIFFUSION_RUNTIME_PREBUILD"


def _cpu_sources(folder: Path):
    """runtime/kernels/cpu_sources.py, loaded by path: importing the package would need torch."""
    name = "_diffusion_runtime_cpu_sources"
    spec = importlib.util.spec_from_file_location(name, folder / "cpu_sources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the classes are made
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def _say(text: str) -> None:
    print(f"diffusion-runtime: {text}", file=sys.stderr, flush=True)


class KernelDistribution(Distribution):
    prebuilt_kernels: list[str] = []

    def has_ext_modules(self) -> bool:
        return bool(self.prebuilt_kernels) or super().has_ext_modules()


class build_py_with_kernels(build_py):
    def run(self):
        super().run()
        self.distribution.prebuilt_kernels = self._prebuild()

    def _prebuild(self) -> list[str]:
        if getattr(self, "editable_mode", False) or bdist_wheel is None:
            return []
        if os.environ.get(ENV, "").strip() == "0":
            _say(f"${ENV}=0: the C kernels are not prebuilt (they compile on first use)")
            return []
        if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
            _say(f"the C kernels are for Linux x86-64; not prebuilt on {sys.platform} {platform.machine()}")
            return []
        folder = Path(self.build_lib) / "runtime" / "kernels"
        try:
            sources = _cpu_sources(folder)
            dest = folder / sources.PREBUILT
            shutil.rmtree(dest, ignore_errors=True)  # nothing stale from an earlier build in this folder
            if sources.find_compiler() is None:
                _say("no C compiler: the C kernels are not prebuilt (they compile on first use)")
                return []
            results = sources.build_prebuilt(dest, folder, log=_say)
        except Exception as e:  # noqa: BLE001 - a broken prebuild must leave a working (JIT) install
            _say(f"prebuilding the C kernels failed ({type(e).__name__}: {e}); they compile on first use")
            return []
        built = sorted(stem for stem, why in results.items() if why is None)
        if not built:
            shutil.rmtree(dest, ignore_errors=True)
        return built


cmdclass = {"build_py": build_py_with_kernels}

if bdist_wheel is not None:
    class bdist_wheel_with_kernels(bdist_wheel):
        def run(self):
            if not self.skip_build:
                self.run_command("build")  # first, so whether the wheel holds native code is known
            self.root_is_pure = not self.distribution.has_ext_modules()
            super().run()

        def get_tag(self):
            tag = super().get_tag()
            return tag if self.root_is_pure else ("py3", "none", tag[2])

    cmdclass["bdist_wheel"] = bdist_wheel_with_kernels

setup(distclass=KernelDistribution, cmdclass=cmdclass)
