"""diffusion-runtime: diffusers-compatible pipelines on our own fast model code."""
from models import ModelMixin  # noqa: F401

from . import errors  # noqa: F401

__version__ = "0.1.0"
