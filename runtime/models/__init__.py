"""The networks (UNet, VAE, CLIP text encoders) and their loading and saving."""
from .attention import Attention, sdpa_backend  # noqa: F401
from .config import ConfigMixin, FrozenConfig, register_to_config  # noqa: F401
from .modeling import ModelMixin  # noqa: F401
from .vae import AutoencoderKL  # noqa: F401
from .unet_2d import UNet2DModel  # noqa: F401
from .unet_2d_condition import UNet2DConditionModel  # noqa: F401
from .clip import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401
from .tokenizer import CLIPTokenizer  # noqa: F401
