"""Schedulers with diffusers' names, configs and interface."""
from .base import SchedulerMixin  # noqa: F401

# name -> class; filled as scheduler files land (each file registers its class here).
SCHEDULER_CLASSES: dict[str, type] = {}
