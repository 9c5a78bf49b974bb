"""CLIP text encoders (Radford et al. 2021, arXiv:2103.00020) with transformers' config and weights.

``CLIPTextModel`` (SD 1.x/2.x ``text_encoder``) and ``CLIPTextModelWithProjection`` (SDXL
``text_encoder_2``) take transformers' ``CLIPTextConfig`` keys and the Stable Diffusion state-dict
layout ``text_model.embeddings...``, ``text_model.encoder.layers.N.self_attn.q_proj...``,
``text_model.final_layer_norm`` (+ ``text_projection.weight``). transformers 5.x saves
``CLIPTextModel`` without the ``text_model.`` prefix; a load-state-dict pre-hook renames those keys
(and drops the legacy ``position_ids`` buffer) so ``forward`` has one code path. Saving always
writes the ``text_model.*`` layout, which both transformers 4.x and 5.x load.

Attention runs through ``CLIPAttention.backend(q, k, v, mask)`` on ``(B, H, T, D)`` tensors; the
mask is an additive float tensor in the query dtype, shape ``(B or 1, 1, T, T)``: 0 where a query
may attend, ``finfo.min`` elsewhere (causal, plus padding when ``attention_mask`` is given).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.lora.model_mixin import LoraModelMixin

from .layers import Linear, concatenated_linear, fused_outputs

from .attention import AttentionBackend, sdpa_backend
from .checkpointing import maybe_checkpoint
from .config import FrozenConfig, register_to_config
from .errors import ConfigError, InputError
from .modeling import ModelMixin
from .outputs import ModelOutput
from .call_slot import CallSlot

# transformers' generic config metadata: read without a warning, never passed to __init__.
TRANSFORMERS_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "dropout",
    "return_dict", "output_hidden_states", "output_attentions", "use_bfloat16", "tie_word_embeddings",
    "is_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "add_cross_attention",
    "tie_encoder_decoder", "pruned_heads", "torchscript", "finetuning_task", "sep_token_id",
    "decoder_start_token_id", "cross_attention_hidden_size", "use_cache", "attn_implementation",
})
TEXT_MODEL_PREFIX = "text_model."
# Top-level names of the encoder in transformers 5.x's prefix-less CLIPTextModel checkpoints.
PREFIXLESS_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
LEGACY_BUFFERS = ("text_model.embeddings.position_ids",)  # saved by transformers < 4.31; not a weight


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclasses.dataclass
class _CLIPOutput(ModelOutput):
    """Tuple view skips ``None`` fields, as transformers' outputs do (``out[-1]`` is hidden_states)."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclasses.dataclass
class CLIPTextModelOutput(_CLIPOutput):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class CLIPTextModelWithProjectionOutput(_CLIPOutput):
    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj)."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden_size // heads
        self.q_proj = Linear(hidden_size, hidden_size)
        self.k_proj = Linear(hidden_size, hidden_size)
        self.v_proj = Linear(hidden_size, hidden_size)
        self.out_proj = Linear(hidden_size, hidden_size)
        self.backend: AttentionBackend = sdpa_backend
        self.fused: str | None = None  # None or "qkv"

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One Linear for q/k/v; the separate projections stay, so unfusing is exact."""
        if self.fused is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        self.to_qkv = concatenated_linear(parts)
        self.fused = "qkv"

    def unfuse_projections(self) -> None:
        if self.fused is not None:
            del self.to_qkv
            self.fused = None

    def fused_projection(self):
        """``(fused Linear, its parts)`` while fused (runtime/lora/fuse.py refreshes it after weight edits)."""
        return self.to_qkv, [self.q_proj, self.k_proj, self.v_proj]

    @torch.no_grad()
    def refresh_fused_projection(self) -> None:
        """Concatenate the parts' current weights into the fused Linear again, in place (``copy_``)."""
        if self.fused is None:
            return
        fused, parts = self.fused_projection()
        fused.weight.copy_(torch.cat([p.weight for p in parts], dim=0))
        fused.bias.copy_(torch.cat([p.bias for p in parts], dim=0))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, width = x.shape
        # the fused matmul computes the projections' operators, their chains' added terms after it
        # (runtime/models/layers.py, ``fused_outputs``); any other entry and the projections run alone
        parts = (self.q_proj, self.k_proj, self.v_proj)
        qkv = fused_outputs(self.to_qkv, parts, x) if self.fused == "qkv" else None
        q, k, v = qkv if qkv is not None else (p(x) for p in parts)
        # (B, T, H*D) -> (B, H, T, D)
        q, k, v = (t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = self.backend(q, k, v, mask)
        # (B, H, T, D) -> (B, T, H*D)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act):
        super().__init__()
        self.fc1 = Linear(hidden_size, intermediate_size)
        self.fc2 = Linear(intermediate_size, hidden_size)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(CallSlot):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, heads: int, eps: float, act):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep_hidden: bool):
        hidden = [x] if keep_hidden else None
        for layer in self.layers:
            x = maybe_checkpoint(self, layer, x, mask)
            if keep_hidden:
                hidden.append(x)
        return x, hidden


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, max_positions: int, hidden_size: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_positions, hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            # Not a buffer: models are built on the meta device and non-persistent buffers would stay there.
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


def causal_attention_bias(attention_mask: torch.Tensor | None, tokens: int, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """Additive mask (B or 1, 1, T, T): 0 where query i may see key j (j <= i and j not padding)."""
    allowed = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, T, T)
    # finfo.min, not -inf: a fully masked row (left padding) gives a uniform softmax, never NaN.
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder and final LayerNorm; returns states and the pooled EOS state."""

    def __init__(self, config: dict):
        super().__init__()
        self.eos_token_id = config["eos_token_id"]
        self.embeddings = CLIPTextEmbeddings(config["vocab_size"], config["max_position_embeddings"],
                                             config["hidden_size"])
        self.encoder = CLIPEncoder(
            config["num_hidden_layers"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], heads=config["num_attention_heads"],
            eps=config["layer_norm_eps"], act=ACTIVATIONS[config["hidden_act"]],
        )
        self.final_layer_norm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position of each row's EOS token (transformers' rule, legacy configs included)."""
        if self.eos_token_id == 2:
            # Configs from before transformers PR #24773 say eos_token_id=2; the EOS token is then
            # found as the largest id in the row (<|endoftext|> is the last token of CLIP's vocab).
            return input_ids.to(torch.int).argmax(dim=-1)
        eos = self.eos_token_id
        is_eos = torch.isin(input_ids, torch.tensor(eos, device=input_ids.device)) if isinstance(eos, list) \
            else input_ids == eos
        return is_eos.to(torch.int).argmax(dim=-1)  # first EOS (padding may also be EOS)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        max_positions = self.embeddings.position_embedding.num_embeddings
        if input_ids.shape[-1] > max_positions:
            raise InputError(f"CLIP text encoder: sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings={max_positions}; truncate with the tokenizer")
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])  # (B, T)
        if attention_mask is not None:
            attention_mask = attention_mask.reshape(-1, attention_mask.shape[-1])
            if attention_mask.shape != input_ids.shape:
                raise InputError(f"CLIP text encoder: attention_mask shape {tuple(attention_mask.shape)} "
                                 f"does not match input_ids shape {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids, position_ids)  # (B, T, C)
        mask = causal_attention_bias(attention_mask, input_ids.shape[-1], x.dtype, x.device)
        x, hidden = self.encoder(x, mask, output_hidden_states)
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_index(input_ids).to(x.device)]  # (B, C)
        return x, pooled, tuple(hidden) if hidden is not None else None


class _CLIPTextBase(LoraModelMixin, ModelMixin):
    """Shared config, weight-name handling and construction of both CLIP text encoders."""

    weights_name = "model"  # transformers' file name: model.safetensors
    has_projection = False

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 77,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,  # kept for the config; inference runs without dropout
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        pad_token_id: int = 1,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
    ):
        super().__init__()
        name = type(self).__name__
        if hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{name} config hidden_act: {hidden_act!r} is not supported "
                              f"(expected one of {', '.join(ACTIVATIONS)})")
        if hidden_size % num_attention_heads:
            raise ConfigError(f"{name} config: hidden_size={hidden_size} is not a multiple of "
                              f"num_attention_heads={num_attention_heads}")
        self.text_model = CLIPTextTransformer(dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings, hidden_act=hidden_act,
            layer_norm_eps=layer_norm_eps, eos_token_id=eos_token_id,
        ))
        if self.has_projection:
            self.text_projection = Linear(hidden_size, projection_dim, bias=False)
        self._init_weights(initializer_range, initializer_factor)
        self.register_load_state_dict_pre_hook(_rename_checkpoint_keys)

    @torch.no_grad()
    def _init_weights(self, initializer_range: float, factor: float) -> None:
        """Random init with transformers' scales (only tests and training see these values)."""
        if next(self.parameters()).is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02 * factor)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=initializer_range * factor)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- config: transformers' keys in, transformers' metadata out -------------------------
    @classmethod
    def extract_init_kwargs(cls, config: dict, source: str | None = None) -> tuple[dict, dict]:
        config = {k: v for k, v in config.items() if k not in TRANSFORMERS_CONFIG_KEYS}
        return super().extract_init_kwargs(config, source=source)

    def register_config(self, config: dict, metadata: dict | None = None) -> None:
        # "architectures" and "model_type" let transformers' Auto classes read what we save.
        extra = {"architectures": [type(self).__name__], "model_type": "clip_text_model"}
        super().register_config(config, {**extra, **(metadata or {})})

    @staticmethod
    def canonical_state_dict(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """Rename transformers 5.x prefix-less keys to ``text_model.*`` and drop legacy buffers."""
        out = {}
        for key, value in state_dict.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name.startswith(PREFIXLESS_ROOTS):
                name = TEXT_MODEL_PREFIX + name
            if name in LEGACY_BUFFERS:
                continue
            out[prefix + name if name is not None else key] = value
        return out

    # ---- the token embedding table (transformers' names; textual inversion resizes it) ------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, embedding: nn.Embedding) -> None:
        self.text_model.embeddings.token_embedding = embedding
        self._set_vocab_size(embedding.num_embeddings)

    @torch.no_grad()
    def set_token_embedding_weight(self, weight: torch.Tensor) -> None:
        """Make ``weight`` (rows, hidden_size) the token table: a new Parameter on the same module
        (hooks on it stay), with the old one's requires_grad; config.vocab_size follows."""
        table = self.get_input_embeddings()
        if weight.ndim != 2 or weight.shape[1] != table.embedding_dim:
            raise InputError(f"{type(self).__name__}: a token embedding table must be (rows, "
                             f"{table.embedding_dim}), got {tuple(weight.shape)}")
        table.weight = nn.Parameter(weight, requires_grad=table.weight.requires_grad)
        table.num_embeddings = weight.shape[0]
        self._set_vocab_size(weight.shape[0])

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None) -> nn.Embedding:
        """Grow or cut the token table to ``new_num_tokens`` rows; the rows kept are exact copies.

        New rows are the mean of the old ones (transformers draws them around that mean; whoever
        resizes writes them anyway). ``None`` returns the table unchanged.
        """
        table = self.get_input_embeddings()
        if new_num_tokens is None or new_num_tokens == table.num_embeddings:
            return table
        if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise InputError(f"resize_token_embeddings: new_num_tokens must be a positive int, got {new_num_tokens!r}")
        old = table.weight
        kept = old[: min(new_num_tokens, old.shape[0])]
        extra = new_num_tokens - kept.shape[0]
        if extra:
            mean = old.float().mean(dim=0, keepdim=True).to(old.dtype)
            kept = torch.cat([kept, mean.expand(extra, -1)])
        self.set_token_embedding_weight(kept.clone())
        return table

    def _set_vocab_size(self, rows: int) -> None:
        if self.config.get("vocab_size") != rows:  # so a saved model loads with its table's size
            object.__setattr__(self, "_internal_config", FrozenConfig({**self.config, "vocab_size": rows}))

    def _run(self, input_ids, attention_mask, position_ids, output_hidden_states):
        if not torch.is_tensor(input_ids):
            raise InputError(f"{type(self).__name__}: input_ids must be a tensor of token ids, "
                             f"got {type(input_ids).__name__}")
        return self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)


def _rename_checkpoint_keys(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook: accept transformers 5.x's layout (keys renamed in place)."""
    renamed = _CLIPTextBase.canonical_state_dict(state_dict, prefix)
    if renamed.keys() != state_dict.keys():
        state_dict.clear()
        state_dict.update(renamed)


class CLIPTextModel(_CLIPTextBase):
    """CLIP text encoder; ``pooler_output`` is the final-normed state at each row's EOS token."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True):
        last, pooled, hidden = self._run(input_ids, attention_mask, position_ids, output_hidden_states)
        out = CLIPTextModelOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(_CLIPTextBase):
    """CLIP text encoder with the projection head; ``text_embeds`` = text_projection(pooled)."""

    has_projection = True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True):
        last, pooled, hidden = self._run(input_ids, attention_mask, position_ids, output_hidden_states)
        out = CLIPTextModelWithProjectionOutput(text_embeds=self.text_projection(pooled),
                                                last_hidden_state=last, hidden_states=hidden)
        return out if return_dict else out.to_tuple()
