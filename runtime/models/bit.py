"""BiT (Big Transfer, Kolesnikov et al. 2019, arXiv:1912.11370): the ResNet backbone of DPT-Hybrid.

Built from transformers' ``BitConfig`` keys (the ``backbone_config`` of a hybrid ``DPTConfig``)
with its state-dict names under ``bit.``: ``embedder.convolution``, ``embedder.norm``,
``encoder.stages.N.layers.M.{conv1,norm1,conv2,norm2,conv3,norm3,downsample.conv,downsample.norm}``
and ``norm`` (pre-activation only). What it computes:

- every convolution is weight-standardised: each output filter is shifted to zero mean and
  scaled to unit (biased) variance over its fan-in, plus ``eps`` (1e-8 here), before the conv;
- ``global_padding="SAME"``: TensorFlow "same" padding, static where the kernel allows it
  (stride 1, odd extent), else computed per input from its size (``same_padding``);
- the stem: 7x7 stride-2 conv, GroupNorm + activation (not for pre-activation), 3x3 stride-2
  max pool (padded "same" with zeros when ``embedding_dynamic_padding``, else unpadded);
- stages of bottleneck blocks (``layer_type="bottleneck"``: ResNet v1.5 with the stride on the
  3x3 conv; ``"preactivation"``: ResNet v2), the first block of each stage with a 1x1
  projection shortcut; width ``make_div(hidden_size * width_factor)``, middle width a quarter;
  stride 1 in the first stage and 2 after, turned into dilation past ``output_stride``.

``forward`` returns the feature maps of ``out_features`` (stage names ``stem``, ``stage1``, ...),
taken before the final norm, as transformers' ``BitBackbone`` does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

# BitConfig's defaults; a hybrid DPTConfig without backbone_config gets DPT_HYBRID_BACKBONE on top.
BIT_DEFAULTS = {
    "num_channels": 3, "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048], "depths": [3, 4, 6, 3],
    "layer_type": "preactivation", "hidden_act": "relu", "global_padding": None, "num_groups": 32,
    "drop_path_rate": 0.0, "embedding_dynamic_padding": False, "output_stride": 32, "width_factor": 1,
    "out_features": None, "out_indices": None,
}
DPT_HYBRID_BACKBONE = {
    "global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
    "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
}
LAYER_TYPES = ("preactivation", "bottleneck")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu}


def bit_settings(backbone_config: dict | None, hybrid_defaults: bool) -> dict:
    """The BiT settings a (possibly partial) backbone_config dict means, defaults filled in."""
    settings = dict(BIT_DEFAULTS)
    if hybrid_defaults and backbone_config is None:
        settings.update(DPT_HYBRID_BACKBONE)
    config = dict(backbone_config or {})
    model_type = config.get("model_type", "bit")
    if model_type != "bit":
        raise ConfigError(f"DPT backbone_config model_type {model_type!r} is not supported (only 'bit', DPT-Hybrid)")
    settings.update({k: v for k, v in config.items() if k in BIT_DEFAULTS})
    padding = settings["global_padding"]
    settings["global_padding"] = padding.upper() if isinstance(padding, str) else padding
    if settings["global_padding"] not in (None, "SAME", "VALID"):
        raise ConfigError(f"BiT config global_padding {padding!r} is not supported (None, 'SAME' or 'VALID')")
    if settings["layer_type"] not in LAYER_TYPES:
        raise ConfigError(f"BiT config layer_type {settings['layer_type']!r} is not one of {', '.join(LAYER_TYPES)}")
    if settings["hidden_act"] not in ACTIVATIONS:
        raise ConfigError(f"BiT config hidden_act {settings['hidden_act']!r} is not one of {', '.join(ACTIVATIONS)}")
    stages = ["stem"] + [f"stage{i}" for i in range(1, len(settings["depths"]) + 1)]
    if settings["out_features"] is None:
        indices = settings["out_indices"]
        settings["out_features"] = [stages[i] for i in indices] if indices is not None else [stages[-1]]
    unknown = [f for f in settings["out_features"] if f not in stages]
    if unknown:
        raise ConfigError(f"BiT config out_features {unknown} are not stage names ({', '.join(stages)})")
    settings["stage_names"] = stages
    return settings


def make_div(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor`` (never below 90% of it), as timm's ResNets do."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TensorFlow's "SAME" adds to one side-pair of an input of ``size``."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(x: torch.Tensor, kernel: int, stride: int, dilation: int, value: float = 0.0) -> torch.Tensor:
    ph = same_padding(x.shape[-2], kernel, stride, dilation)
    pw = same_padding(x.shape[-1], kernel, stride, dilation)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


class StandardizedConv2d(nn.Module):
    """A bias-free conv whose filters are standardised per output channel on every call.

    Deliberately not an ``nn.Conv2d``: passes that replace convolution kernels (prepack,
    winograd) must not run it as a plain convolution of the raw weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 padding: str | None = "SAME", eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.kernel_size, self.stride, self.dilation, self.eps = kernel_size, stride, dilation, eps
        self.dynamic = False
        if padding is None or padding == "SAME" and stride == 1 and dilation * (kernel_size - 1) % 2 == 0:
            self.padding = (stride - 1 + dilation * (kernel_size - 1)) // 2
        elif padding == "SAME":
            self.padding, self.dynamic = 0, True
        else:  # "VALID"
            self.padding = 0

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
        return ((flat - mean) * torch.rsqrt(var + self.eps)).reshape_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), None, self.stride, self.padding, self.dilation)


class BitGroupNormActivation(nn.GroupNorm):
    """GroupNorm followed by the configured activation (or none)."""

    def __init__(self, groups: int, channels: int, act, apply_activation: bool = True, eps: float = 1e-5):
        super().__init__(groups, channels, eps=eps)
        self.act = act if apply_activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(x) if self.act is not None else x


class BitMaxPool(nn.Module):
    """3x3 stride-2 max pool, "same"-padded with zeros when ``dynamic``."""

    def __init__(self, dynamic: bool):
        super().__init__()
        self.dynamic = dynamic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            x = pad_same(x, 3, 2, 1, value=0.0)
        return F.max_pool2d(x, 3, 2)


class BitEmbeddings(nn.Module):
    def __init__(self, s: dict, act):
        super().__init__()
        self.convolution = StandardizedConv2d(s["num_channels"], s["embedding_size"], 7, stride=2, eps=1e-8,
                                              padding=s["global_padding"])
        self.pooler = BitMaxPool(s["embedding_dynamic_padding"])
        self.pad_one = s["global_padding"] != "SAME"  # a 1-pixel zero border before the pool
        self.norm = (BitGroupNormActivation(s["num_groups"], s["embedding_size"], act)
                     if s["layer_type"] != "preactivation" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convolution(x)
        if self.pad_one:
            x = F.pad(x, (1, 1, 1, 1), value=0.0)
        if self.norm is not None:
            x = self.norm(x)
        return self.pooler(x)


class BitDownsampleConv(nn.Module):
    def __init__(self, s: dict, in_channels: int, out_channels: int, stride: int, preact: bool):
        super().__init__()
        self.conv = StandardizedConv2d(in_channels, out_channels, 1, stride=stride, eps=1e-8, padding=s["global_padding"])
        self.norm = None if preact else BitGroupNormActivation(s["num_groups"], out_channels, None, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.norm(x) if self.norm is not None else x


class BitBottleneckLayer(nn.Module):
    """ResNet v1.5 bottleneck: 1x1, 3x3 (stride, dilation), 1x1 with norms; act(x + shortcut)."""

    def __init__(self, s: dict, act, in_channels: int, out_channels: int, stride: int, first_dilation: int,
                 first_layer: bool):
        super().__init__()
        mid = make_div(out_channels * 0.25)
        pad, groups = s["global_padding"], s["num_groups"]
        self.downsample = BitDownsampleConv(s, in_channels, out_channels, stride, preact=False) if first_layer else None
        self.conv1 = StandardizedConv2d(in_channels, mid, 1, eps=1e-8, padding=pad)
        self.norm1 = BitGroupNormActivation(groups, mid, act)
        self.conv2 = StandardizedConv2d(mid, mid, 3, stride=stride, dilation=first_dilation, eps=1e-8, padding=pad)
        self.norm2 = BitGroupNormActivation(groups, mid, act)
        self.conv3 = StandardizedConv2d(mid, out_channels, 1, eps=1e-8, padding=pad)
        self.norm3 = BitGroupNormActivation(groups, out_channels, act, apply_activation=False)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        h = self.norm1(self.conv1(x))
        h = self.norm2(self.conv2(h))
        h = self.norm3(self.conv3(h))
        return self.act(h + shortcut)


class BitPreActivationBottleneckLayer(nn.Module):
    """ResNet v2 bottleneck: norm-act before each conv; the shortcut projects the pre-activation."""

    def __init__(self, s: dict, act, in_channels: int, out_channels: int, stride: int, first_dilation: int,
                 first_layer: bool):
        super().__init__()
        mid = make_div(out_channels * 0.25)
        pad, groups = s["global_padding"], s["num_groups"]
        self.downsample = BitDownsampleConv(s, in_channels, out_channels, stride, preact=True) if first_layer else None
        self.norm1 = BitGroupNormActivation(groups, in_channels, act)
        self.conv1 = StandardizedConv2d(in_channels, mid, 1, eps=1e-8, padding=pad)
        self.norm2 = BitGroupNormActivation(groups, mid, act)
        self.conv2 = StandardizedConv2d(mid, mid, 3, stride=stride, eps=1e-8, padding=pad)  # no dilation, as in transformers
        self.norm3 = BitGroupNormActivation(groups, mid, act)
        self.conv3 = StandardizedConv2d(mid, out_channels, 1, eps=1e-8, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.norm1(x)
        shortcut = self.downsample(pre) if self.downsample is not None else x
        h = self.conv1(pre)
        h = self.conv2(self.norm2(h))
        h = self.conv3(self.norm3(h))
        return h + shortcut


class BitStage(nn.Module):
    def __init__(self, s: dict, act, in_channels: int, out_channels: int, stride: int, dilation: int, depth: int):
        super().__init__()
        layer_cls = BitBottleneckLayer if s["layer_type"] == "bottleneck" else BitPreActivationBottleneckLayer
        first_dilation = 1 if dilation in (1, 2) else 2
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.add_module(str(i), layer_cls(s, act, in_channels, out_channels, stride if i == 0 else 1,
                                                     first_dilation, first_layer=i == 0))
            in_channels, first_dilation = out_channels, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BitEncoder(nn.Module):
    def __init__(self, s: dict, act):
        super().__init__()
        self.stages = nn.ModuleList()
        channels, current_stride, dilation = s["embedding_size"], 4, 1
        for index, (depth, width) in enumerate(zip(s["depths"], s["hidden_sizes"])):
            out_channels = make_div(width * s["width_factor"])
            stride = 1 if index == 0 else 2
            if current_stride >= s["output_stride"]:
                dilation *= stride
                stride = 1
            self.stages.append(BitStage(s, act, channels, out_channels, stride, dilation, depth))
            channels = out_channels
            current_stride *= stride


class BitModel(nn.Module):
    """The ``bit.`` module: stem, stages, and the final norm of pre-activation nets (unused by DPT)."""

    def __init__(self, s: dict):
        super().__init__()
        act = ACTIVATIONS[s["hidden_act"]]
        self.embedder = BitEmbeddings(s, act)
        self.encoder = BitEncoder(s, act)
        self.norm = (BitGroupNormActivation(s["num_groups"], s["hidden_sizes"][-1], act)
                     if s["layer_type"] == "preactivation" else None)


class BitBackbone(nn.Module):
    """Feature maps of the configured stages, (B, C_i, H_i, W_i) each."""

    def __init__(self, settings: dict):
        super().__init__()
        self.settings = settings
        self.bit = BitModel(settings)
        self.out_features = list(settings["out_features"])
        stages = settings["stage_names"]
        self.out_positions = [stages.index(name) for name in self.out_features]
        widths = [settings["embedding_size"]] + [make_div(w * settings["width_factor"]) for w in settings["hidden_sizes"]]
        self.channels = [widths[i] for i in self.out_positions]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = self.bit.embedder(pixel_values)
        states = [x]
        for stage in self.bit.encoder.stages:
            x = stage(x)
            states.append(x)
        return [states[i] for i in self.out_positions]
