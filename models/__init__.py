"""The networks (UNet, VAE, CLIP text encoders) and their loading and saving."""
from .attention import Attention, sdpa_backend  # noqa: F401
from .config import ConfigMixin, FrozenConfig, register_to_config  # noqa: F401
from .modeling import ModelMixin  # noqa: F401
