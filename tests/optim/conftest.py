"""The optimization tests run on the pipeline tests' tiny diffusers-built checkpoints."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))  # TEMP until fixtures move

from pipeline_fixtures import ddpm_folder, one_thread, sd_folder  # noqa: E402,F401
