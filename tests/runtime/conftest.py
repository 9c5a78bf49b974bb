"""Session fixtures shared by the pipeline tests: each tiny checkpoint is built once per run."""
from pipeline_fixtures import ddpm_folder, one_thread, sd_folder, sd_inpaint_folder, sdxl_folder  # noqa: F401
