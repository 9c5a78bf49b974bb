"""A tiny ModelMixin subclass for the loading/saving tests (independent of the real networks)."""
from __future__ import annotations

import torch
from torch import nn

from runtime.models import ModelMixin, register_to_config


class ToyModel(ModelMixin):
    """Linear + Conv + Embedding, a persistent buffer and a non-persistent one (never saved)."""

    @register_to_config
    def __init__(self, width: int = 8, channels: int = 3, vocab: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels))
        self.block.gradient_checkpointing = False
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))
        self.register_buffer("positions", torch.arange(width) * 2, persistent=False)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(self.embed(ids) + self.positions) * self.scale, self.block(image)


class HookedToyModel(ToyModel):
    """Recomputes its non-persistent buffer itself (the fast path of weight_loading.py)."""

    init_calls = 0

    def _init_non_persistent_buffers(self) -> None:
        type(self).init_calls += 1
        self.positions = torch.arange(self.config.width) * 2


class RequiredToyModel(ModelMixin):
    """A config key without a default (missing in a config.json -> ConfigError)."""

    @register_to_config
    def __init__(self, width: int, depth: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))


def make_toy(seed: int = 0, **config) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(**config).eval()


def assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    """Bit-equal state dicts: same keys, dtypes, shapes and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
