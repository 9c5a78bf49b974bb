"""The parts of DPT (Ranftl et al. 2021, arXiv:2103.13413), with transformers' module names.

- embeddings: ``DPTViTHybridEmbeddings`` (BiT feature map at stride 16, 1x1 ``projection``) or
  ``DPTViTEmbeddings`` (``patch_embeddings.projection``, a patch-size conv); both prepend
  ``cls_token`` and add ``position_embeddings``, resized bilinearly to the patch grid;
- ``DPTViTEncoder``: pre-norm ViT layers (``layernorm_before``, ``attention.attention.{query,key,
  value}``, ``attention.output.dense``, ``layernorm_after``, ``intermediate.dense``, ``output.dense``);
  attention runs through the ``backend`` slot (docs/ARCHITECTURE.md §3), no mask;
- ``DPTNeck``: the reassemble stage (readout token handling, 1x1 projection, resize by
  ``reassemble_factors``: transposed conv up, identity, strided 3x3 conv down), one 3x3 conv per
  level to ``fusion_hidden_size``, and the fusion stage (coarsest first: pre-activation residual
  units, bilinear 2x upsampling with corners aligned, 1x1 projection);
- ``DPTDepthEstimationHead``: 3x3 conv to half width, 2x bilinear up, 3x3 conv to 32, ReLU,
  1x1 conv to 1, ReLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, sdpa_backend
from .bit import BitBackbone
from .errors import InputError

ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def resize_position_embeddings(posemb: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + N, C) -> (1, 1 + grid_h * grid_w, C): the square grid part resized bilinearly."""
    token, grid = posemb[:, :1], posemb[0, 1:]
    old = int(grid.shape[0] ** 0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C, old, old)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([token, grid], dim=1)


class DPTViTHybridEmbeddings(nn.Module):
    """BiT features -> tokens; also returns the first two BiT feature maps for the neck."""

    def __init__(self, c: dict, bit_settings: dict):
        super().__init__()
        self.image_size, self.patch_size = c["image_size"], c["patch_size"]
        self.backbone = BitBackbone(bit_settings)
        if len(self.backbone.channels) != 3:
            raise InputError(f"DPT-Hybrid needs 3 backbone out_features, got {self.backbone.out_features}")
        feature_dim = c["backbone_featmap_shape"][1]
        patches = (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)
        self.projection = nn.Conv2d(feature_dim, c["hidden_size"], kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c["hidden_size"]))
        self.position_embeddings = nn.Parameter(torch.zeros(1, patches + 1, c["hidden_size"]))

    def forward(self, pixel_values: torch.Tensor):
        batch, _, height, width = pixel_values.shape
        if (height, width) != tuple(self.image_size):
            raise InputError(f"DPT-Hybrid: input size {height}x{width} does not match the model's image_size "
                             f"{self.image_size[0]}x{self.image_size[1]}; resize with the image processor")
        pos = resize_position_embeddings(self.position_embeddings, height // self.patch_size, width // self.patch_size)
        features = self.backbone(pixel_values)
        tokens = self.projection(features[-1]).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        return tokens + pos, features[:2]


class DPTViTPatchEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        p = c["patch_size"]
        self.projection = nn.Conv2d(c["num_channels"], c["hidden_size"], kernel_size=p, stride=p)


class DPTViTEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.patch_size = c["patch_size"]
        patches = (c["image_size"][0] // self.patch_size) * (c["image_size"][1] // self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c["hidden_size"]))
        self.patch_embeddings = DPTViTPatchEmbeddings(c)
        self.position_embeddings = nn.Parameter(torch.zeros(1, patches + 1, c["hidden_size"]))

    def forward(self, pixel_values: torch.Tensor):
        batch, _, height, width = pixel_values.shape
        pos = resize_position_embeddings(self.position_embeddings, height // self.patch_size, width // self.patch_size)
        tokens = self.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        return tokens + pos, []


class DPTSelfAttention(nn.Module):
    """q/k/v projections and the attention call (the ``backend`` slot; ``fuse_projections``)."""

    def __init__(self, hidden: int, heads: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden, bias=bias)
        self.key = nn.Linear(hidden, hidden, bias=bias)
        self.value = nn.Linear(hidden, hidden, bias=bias)
        self.backend: AttentionBackend = sdpa_backend
        self.fused: str | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One Linear for q/k/v; the separate projections stay, so unfusing is exact."""
        if self.fused is not None:
            return
        parts = (self.query, self.key, self.value)
        weight = torch.cat([p.weight for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                          device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(False)
        self.to_qkv = fused
        self.fused = "qkv"

    def unfuse_projections(self) -> None:
        if self.fused is not None:
            del self.to_qkv
            self.fused = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        if self.fused == "qkv":
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        # (B, T, H*D) -> (B, H, T, D)
        q, k, v = (t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = self.backend(q, k, v, None)
        return out.transpose(1, 2).reshape(batch, tokens, width)


class _Dense(nn.Module):
    """A Linear under the name ``dense`` (transformers' ``*.output.dense`` / ``intermediate.dense``)."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.dense = nn.Linear(fan_in, fan_out)


class DPTViTAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool):
        super().__init__()
        self.attention = DPTSelfAttention(hidden, heads, bias)
        self.output = _Dense(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class DPTViTLayer(nn.Module):
    """x + attn(ln_before(x)), then x + mlp(ln_after(x))."""

    def __init__(self, c: dict):
        super().__init__()
        hidden, eps = c["hidden_size"], c["layer_norm_eps"]
        self.attention = DPTViTAttention(hidden, c["num_attention_heads"], c["qkv_bias"])
        self.intermediate = _Dense(hidden, c["intermediate_size"])
        self.output = _Dense(c["intermediate_size"], hidden)
        self.layernorm_before = nn.LayerNorm(hidden, eps=eps)
        self.layernorm_after = nn.LayerNorm(hidden, eps=eps)
        self.act = ACTIVATIONS[c["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class DPTViTEncoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList(DPTViTLayer(c) for _ in range(c["num_hidden_layers"]))

    def forward(self, x: torch.Tensor, keep: set[int]) -> list[torch.Tensor]:
        """The outputs of the layers whose index is in ``keep``, in order."""
        kept = []
        for index, layer in enumerate(self.layer):
            x = layer(x)
            if index in keep:
                kept.append(x)
        return kept


class DPTViTModel(nn.Module):
    """The ``dpt.`` module of DPTForDepthEstimation (its final ``layernorm`` is loaded, not used)."""

    def __init__(self, c: dict, bit_settings: dict | None):
        super().__init__()
        self.embeddings = DPTViTHybridEmbeddings(c, bit_settings) if c["is_hybrid"] else DPTViTEmbeddings(c)
        self.encoder = DPTViTEncoder(c)
        self.layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])


class _Readout(nn.Sequential):
    """``readout_projects.N``: Linear(2C, C) then the activation, as ``N.0`` (transformers' Sequential)."""

    def __init__(self, hidden: int, act):
        super().__init__(nn.Linear(2 * hidden, hidden))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self[0](x))


class DPTReassembleLayer(nn.Module):
    def __init__(self, hidden: int, channels: int, factor: float):
        super().__init__()
        self.projection = nn.Conv2d(hidden, channels, kernel_size=1)
        if factor > 1:
            self.resize = nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
        elif factor == 1:
            self.resize = nn.Identity()
        else:
            self.resize = nn.Conv2d(channels, channels, kernel_size=3, stride=int(1 / factor), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resize(self.projection(x))


class DPTReassembleStage(nn.Module):
    """Tokens (B, 1 + h*w, C) -> feature maps; levels in ``neck_ignore_stages`` pass through."""

    def __init__(self, c: dict):
        super().__init__()
        hidden, act = c["hidden_size"], ACTIVATIONS[c["hidden_act"]]
        self.readout_type = c["readout_type"]
        self.ignore = set(c["neck_ignore_stages"])
        self.layers = nn.ModuleList()
        readouts = []
        for i, (channels, factor) in enumerate(zip(c["neck_hidden_sizes"], c["reassemble_factors"])):
            passthrough = c["is_hybrid"] and i <= 1
            self.layers.append(nn.Identity() if passthrough else DPTReassembleLayer(hidden, channels, factor))
            readouts.append(nn.Identity() if passthrough else _Readout(hidden, act))
        if self.readout_type == "project":
            self.readout_projects = nn.ModuleList(readouts)

    def forward(self, states: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        out = []
        for i, x in enumerate(states):
            if i not in self.ignore:
                cls, x = x[:, 0], x[:, 1:]  # (B, C), (B, h*w, C)
                batch, _, channels = x.shape
                if self.readout_type == "project":
                    x = self.readout_projects[i](torch.cat([x, cls[:, None].expand_as(x)], dim=-1))
                elif self.readout_type == "add":
                    x = x + cls[:, None]
                x = x.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])  # (B, C, h, w)
                x = self.layers[i](x)
            out.append(x)
        return out


class DPTPreActResidualLayer(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), each conv optionally followed by BatchNorm."""

    def __init__(self, c: dict):
        super().__init__()
        width = c["fusion_hidden_size"]
        self.use_batch_norm = bool(c["use_batch_norm_in_fusion_residual"])
        bias = c["use_bias_in_fusion_residual"]
        bias = (not self.use_batch_norm) if bias is None else bool(bias)
        self.convolution1 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=bias)
        self.convolution2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=bias)
        if self.use_batch_norm:
            self.batch_norm1 = nn.BatchNorm2d(width)
            self.batch_norm2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convolution1(F.relu(x))
        if self.use_batch_norm:
            h = self.batch_norm1(h)
        h = self.convolution2(F.relu(h))
        if self.use_batch_norm:
            h = self.batch_norm2(h)
        return h + x


class DPTFeatureFusionLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        width = c["fusion_hidden_size"]
        self.projection = nn.Conv2d(width, width, kernel_size=1)
        self.residual_layer1 = DPTPreActResidualLayer(c)
        self.residual_layer2 = DPTPreActResidualLayer(c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.residual_layer1(skip)
        x = self.residual_layer2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.projection(x)


class DPTFeatureFusionStage(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layers = nn.ModuleList(DPTFeatureFusionLayer(c) for _ in c["neck_hidden_sizes"])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        fused, out = None, []
        for x, layer in zip(features[::-1], self.layers):  # coarsest level first
            fused = layer(x) if fused is None else layer(fused, x)
            out.append(fused)
        return out


class DPTNeck(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.reassemble_stage = DPTReassembleStage(c)
        self.convs = nn.ModuleList(nn.Conv2d(ch, c["fusion_hidden_size"], kernel_size=3, padding=1, bias=False)
                                   for ch in c["neck_hidden_sizes"])
        self.fusion_stage = DPTFeatureFusionStage(c)

    def forward(self, states: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        features = self.reassemble_stage(states, grid)
        return self.fusion_stage([conv(f) for conv, f in zip(self.convs, features)])


class _HeadStack(nn.Sequential):
    """``head.head``: transformers' Sequential indices 0 (conv), 2 (conv), 4 (conv) hold weights."""

    def __init__(self, width: int):
        super().__init__(
            nn.Conv2d(width, width // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(width // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(),
        )


class DPTDepthEstimationHead(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.head_in_index = c["head_in_index"]
        self.projection = nn.Conv2d(256, 256, kernel_size=3, padding=1) if c["add_projection"] else None
        self.head = _HeadStack(c["fusion_hidden_size"])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[self.head_in_index]
        if self.projection is not None:
            x = F.relu(self.projection(x))
        return self.head(x).squeeze(1)  # (B, H, W)
