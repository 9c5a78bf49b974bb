"""Shared fixtures: the tiny diffusers-built checkpoints (each built once per run), and one torch
thread per test process (tiny models run fastest so on the 2-core test machines)."""
import pytest
import torch

from pipeline_fixtures import (  # noqa: F401  (tests/ is on sys.path through this conftest)
    ddpm_folder,
    one_thread,
    sd_folder,
    sd_inpaint_folder,
    sdxl_folder,
)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
