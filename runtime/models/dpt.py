"""DPTForDepthEstimation: the depth estimator of Stable Diffusion 2 depth, transformers' config and weights.

Takes transformers' ``DPTConfig`` keys (``config.json`` of ``depth_estimator/``) and its
state-dict names (``dpt.embeddings...``, ``dpt.encoder.layer.N...``, ``neck...``, ``head.head...``;
file ``model.safetensors``). Two embeddings are implemented: the hybrid ViT + BiT backbone
(``is_hybrid=True``, ``backbone_config`` a ``BitConfig`` dict; the SD 2 depth checkpoint,
Intel/dpt-hybrid-midas) and the plain ViT patch embedding (``is_hybrid=False`` without a
``backbone_config``: dpt-large). Other backbones (DINOv2, Swin, ...) are a ``ConfigError``.
Parts: runtime/models/dpt_blocks.py and runtime/models/bit.py.

Which states feed the neck: hybrid, the BiT stage-1 and stage-2 maps, then the outputs of
ViT layers ``backbone_out_indices[2:]``; plain, the outputs of ViT layers ``backbone_out_indices``.
``forward(pixel_values)`` returns ``DepthEstimatorOutput(predicted_depth=(B, H, W))``, the
relative inverse depth at the input resolution (ReLU'd, unnormalised), as transformers does.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .bit import bit_settings
from .clip import TRANSFORMERS_CONFIG_KEYS
from .config import register_to_config
from .dpt_blocks import ACTIVATIONS, DPTDepthEstimationHead, DPTNeck, DPTViTModel
from .errors import ConfigError, InputError
from .modeling import ModelMixin
from .outputs import BaseOutput

READOUT_TYPES = ("ignore", "add", "project")


@dataclasses.dataclass
class DepthEstimatorOutput(BaseOutput):
    predicted_depth: torch.Tensor
    hidden_states: tuple | None = None
    attentions: tuple | None = None


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


class DPTForDepthEstimation(ModelMixin):
    """DPT with its depth head; see the module docstring for the supported configurations."""

    weights_name = "model"  # transformers' file name: model.safetensors

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,  # inference runs without dropout
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size=384,
        patch_size: int = 16,
        num_channels: int = 3,
        is_hybrid: bool = False,
        qkv_bias: bool = True,
        backbone_out_indices=(2, 5, 8, 11),
        readout_type: str = "project",
        reassemble_factors=(4, 2, 1, 0.5),
        neck_hidden_sizes=(96, 192, 384, 768),
        fusion_hidden_size: int = 256,
        head_in_index: int = -1,
        use_batch_norm_in_fusion_residual: bool = False,
        use_bias_in_fusion_residual: bool | None = None,
        add_projection: bool = False,
        use_auxiliary_head: bool = True,  # segmentation-only keys, kept for the config
        auxiliary_loss_weight: float = 0.4,
        semantic_loss_ignore_index: int = 255,
        semantic_classifier_dropout: float = 0.1,
        backbone_featmap_shape=(1, 1024, 24, 24),
        neck_ignore_stages=(0, 1),
        backbone_config: dict | None = None,
        pooler_output_size: int | None = None,
        pooler_act: str = "tanh",
        backbone: str | None = None,
        use_pretrained_backbone: bool = False,
        use_timm_backbone: bool = False,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        if backbone is not None or use_timm_backbone or (backbone_config is not None and not is_hybrid):
            raise ConfigError(f"{name} config: a DPT with a separate backbone (backbone={backbone!r}, "
                              f"backbone_config model_type "
                              f"{(backbone_config or {}).get('model_type')!r}) is not supported; only the "
                              f"hybrid ViT + BiT (is_hybrid=True) and the plain ViT DPT are")
        if hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{name} config hidden_act: {hidden_act!r} is not supported "
                              f"(expected one of {', '.join(ACTIVATIONS)})")
        if readout_type not in READOUT_TYPES:
            raise ConfigError(f"{name} config readout_type: {readout_type!r} is not one of {', '.join(READOUT_TYPES)}")
        if is_hybrid and readout_type != "project":
            raise ConfigError(f"{name} config: DPT-Hybrid needs readout_type='project', got {readout_type!r}")
        if hidden_size % num_attention_heads:
            raise ConfigError(f"{name} config: hidden_size={hidden_size} is not a multiple of "
                              f"num_attention_heads={num_attention_heads}")
        if len(neck_hidden_sizes) != len(reassemble_factors) or len(neck_hidden_sizes) != (
                len(backbone_out_indices) if not is_hybrid else 2 + len(list(backbone_out_indices)[2:])):
            raise ConfigError(f"{name} config: neck_hidden_sizes {list(neck_hidden_sizes)}, reassemble_factors "
                              f"{list(reassemble_factors)} and backbone_out_indices {list(backbone_out_indices)} "
                              f"must give one feature map per neck level")
        settings = bit_settings(backbone_config, hybrid_defaults=True) if is_hybrid else None
        self.out_indices = list(backbone_out_indices)[2:] if is_hybrid else list(backbone_out_indices)
        parts = dict(
            hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
            image_size=_pair(image_size), patch_size=int(patch_size), num_channels=num_channels, is_hybrid=is_hybrid,
            qkv_bias=qkv_bias, readout_type=readout_type, reassemble_factors=list(reassemble_factors),
            neck_hidden_sizes=list(neck_hidden_sizes), fusion_hidden_size=fusion_hidden_size,
            head_in_index=head_in_index, use_batch_norm_in_fusion_residual=use_batch_norm_in_fusion_residual,
            use_bias_in_fusion_residual=use_bias_in_fusion_residual, add_projection=add_projection,
            backbone_featmap_shape=list(backbone_featmap_shape or ()),
            neck_ignore_stages=list(neck_ignore_stages) if is_hybrid else [],
        )
        self.dpt = DPTViTModel(parts, settings)
        self.neck = DPTNeck(parts)
        self.head = DPTDepthEstimationHead(parts)
        self._init_weights(initializer_range)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        """Random init with transformers' scales for ViT parts (only tests see these values)."""
        if next(self.parameters()).is_meta:
            return
        for m in self.dpt.encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- config: transformers' keys in, transformers' metadata out -------------------------
    @classmethod
    def extract_init_kwargs(cls, config: dict, source: str | None = None) -> tuple[dict, dict]:
        config = {k: v for k, v in config.items() if k not in TRANSFORMERS_CONFIG_KEYS}
        return super().extract_init_kwargs(config, source=source)

    def register_config(self, config: dict, metadata: dict | None = None) -> None:
        # "architectures" and "model_type" let transformers' Auto classes read what we save.
        extra = {"architectures": [type(self).__name__], "model_type": "dpt"}
        super().register_config(config, {**extra, **(metadata or {})})

    # ---- inference -----------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, return_dict: bool = True, **kwargs):
        if not torch.is_tensor(pixel_values) or pixel_values.ndim != 4:
            raise InputError(f"{type(self).__name__}: pixel_values must be a (B, C, H, W) tensor, "
                             f"got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
        channels = self.config.num_channels
        if pixel_values.shape[1] != channels:
            raise InputError(f"{type(self).__name__}: pixel_values has {pixel_values.shape[1]} channels, "
                             f"the model expects num_channels={channels}")
        if kwargs.get("labels") is not None:
            raise InputError(f"{type(self).__name__}: training (labels=) is not implemented")
        pixel_values = pixel_values.to(self.dtype)
        tokens, maps = self.dpt.embeddings(pixel_values)
        states = list(maps) + self.dpt.encoder(tokens, set(self.out_indices))
        patch = self.config.patch_size
        grid = (int(tokens.shape[1] - 1) // (pixel_values.shape[-1] // patch), pixel_values.shape[-1] // patch)
        features = self.neck(states, grid)
        depth = self.head(features)
        out = DepthEstimatorOutput(predicted_depth=depth)
        return out if return_dict else out.to_tuple()
