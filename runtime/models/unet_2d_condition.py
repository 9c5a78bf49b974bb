"""The text-conditioned UNet of Stable Diffusion 1.x / 2.x / SDXL, loading diffusers' checkpoints as is.

Same ``config.json`` keys and state-dict names as diffusers' ``UNet2DConditionModel``; the block
types a config names are built through ``block_table``. ``forward`` is written as explicit stages
(``_embed``, ``_down``, ``_mid``, ``_up``) over a list of skip features, so DeepCache can run the
shallow path and resume from a cached deep feature (see ``FeatureCache``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from runtime.lora.model_mixin import LoraModelMixin

from .attention_slicing import AttentionSlicingMixin
from .layers import Conv2d, Linear
from .block_table import build_block
from .config import register_to_config
from .embeddings import Timesteps, TimestepEmbedding, activation, text_time_embedding
from .errors import InputError
from .modeling import ModelMixin
from .outputs import ModelOutput
from .single_file import FromOriginalModelMixin
from .unet_config import UNetLayout, resolve_layout


@dataclass
class UNet2DConditionOutput(ModelOutput):
    """``sample``: the predicted noise / v / x0, ``(B, out_channels, H, W)``; ``out[0]`` works too."""

    sample: torch.Tensor


@dataclass
class FeatureCache:
    """DeepCache's slot on the UNet (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free").

    ``branch``: index of the deepest down block the shallow path runs (0 = shallowest).
    ``mode="store"``: run the full network and keep in ``features`` the hidden state that enters up
    block ``num_up_blocks - 1 - branch``. ``mode="reuse"``: run down blocks ``0..branch`` (their
    skips), skip everything deeper, and resume the up path from ``features``.
    ``layer``: cut inside block ``branch`` instead: the shallow path runs only its layers
    ``0..layer`` and the up layers that read their skips (``None``: the whole block).
    """

    branch: int = 0
    mode: str = "store"
    features: torch.Tensor | None = None
    layer: int | None = None


class _Cut(NamedTuple):
    mode: str
    down: tuple  # (last, last_layers) for ``_down`` on the shallow path
    up: dict  # start / start_layer (reuse) or store_at / store_layer (store) for ``_up``


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, S)`` keep(1)/discard(0) mask -> additive bias ``(B, 1, 1, S)`` for (B, H, T, S) scores."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


class UNet2DConditionModel(FromOriginalModelMixin, AttentionSlicingMixin, LoraModelMixin, ModelMixin):
    """Conditional UNet: ``(noisy latents, timestep, text states) -> prediction``.

    LoRA adapters: runtime/lora (``load_lora_adapter``, ``set_adapters``, ``fuse_lora``, ...);
    ``cross_attention_kwargs={"scale": s}`` scales the unfused adapters for this call (this thread).
    """

    def __call__(self, *args, **kwargs):
        # diffusers' call-time LoRA scale, taken here, outside any compiled forward: the scale is set for
        # this thread around the call and the forward never sees it (runtime/lora/state.py)
        extra = kwargs.get("cross_attention_kwargs")
        if extra and "scale" in extra:
            from runtime.lora.state import call_scale

            extra = dict(extra)
            scale = extra.pop("scale")
            kwargs["cross_attention_kwargs"] = extra or None
            with call_scale([self], scale):
                return super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    @register_to_config
    def __init__(
        self,
        sample_size: int | list[int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: list[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: list[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: bool | list[bool] = False,
        block_out_channels: list[int] = (320, 640, 1280, 1280),
        layers_per_block: int | list[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | list[int] = 1280,
        transformer_layers_per_block: int | list = 1,
        reverse_transformer_layers_per_block: list | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | list[int] = 8,
        num_attention_heads: int | list[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,  # only read by block types we do not build
        resnet_out_scale_factor: float = 1.0,  # only read by block types we do not build
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,  # only read by block types we do not build
        cross_attention_norm: str | None = None,  # only read by block types we do not build
        addition_embed_type_num_heads: int = 64,  # only read by addition_embed_type="text"
    ):
        super().__init__()
        cfg = dict(locals())
        cfg.pop("self")
        cfg.pop("__class__", None)
        lay: UNetLayout = resolve_layout(cfg)
        self.num_upsamplers = lay.num_blocks - 1
        channels = list(block_out_channels)

        self.conv_in = Conv2d(in_channels, channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)

        # time, class and added embeddings
        time_embed_dim = time_embedding_dim or channels[0] * 4
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, act_fn=act_fn,
                                                post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim)
        self.encoder_hid_proj = Linear(encoder_hid_dim, lay.cross_attention_dim[0]) \
            if lay.encoder_hid_dim_type == "text_proj" else None
        self.class_embedding = None
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(channels[0], time_embed_dim, act_fn=act_fn)
        elif class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        if addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.time_embed_act = activation(time_embedding_act_fn, "time_embedding_act_fn") \
            if time_embedding_act_fn is not None else None
        temb_channels = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        # every block gets the keywords diffusers' get_down_block passes; build_block keeps the ones it takes
        common = dict(temb_channels=temb_channels, resnet_eps=norm_eps, resnet_act_fn=act_fn,
                      resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      dropout=dropout)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(down_block_types):
            self.down_blocks.append(build_block(
                kind, "down_block_types entry", **common,
                in_channels=channels[max(i - 1, 0)], out_channels=channels[i], num_layers=lay.layers_per_block[i],
                transformer_layers_per_block=lay.transformer_layers[i], add_downsample=i < lay.num_blocks - 1,
                downsample_padding=downsample_padding, cross_attention_dim=lay.cross_attention_dim[i],
                num_attention_heads=lay.num_attention_heads[i], only_cross_attention=lay.only_cross_attention[i],
                attention_head_dim=lay.attention_head_dim[i] or channels[i],
            ))
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = build_block(
                mid_block_type, "mid_block_type", **common, in_channels=channels[-1],
                output_scale_factor=mid_block_scale_factor, transformer_layers_per_block=lay.transformer_layers[-1],
                num_attention_heads=lay.num_attention_heads[-1], cross_attention_dim=lay.cross_attention_dim[-1],
            )
        self.up_blocks = nn.ModuleList()
        rev_channels = channels[::-1]
        for i, kind in enumerate(up_block_types):
            j = lay.num_blocks - 1 - i  # the down block this up block mirrors
            self.up_blocks.append(build_block(
                kind, "up_block_types entry", **common,
                in_channels=rev_channels[min(i + 1, lay.num_blocks - 1)], out_channels=rev_channels[i],
                prev_output_channel=rev_channels[max(i - 1, 0)], num_layers=lay.layers_per_block[j] + 1,
                transformer_layers_per_block=lay.up_transformer_layers[i], add_upsample=i < lay.num_blocks - 1,
                resolution_idx=i, cross_attention_dim=lay.cross_attention_dim[j],
                num_attention_heads=lay.num_attention_heads[j], only_cross_attention=lay.only_cross_attention[j],
                attention_head_dim=lay.attention_head_dim[i] or rev_channels[i],
            ))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps)
        self.conv_act = activation(act_fn)
        self.conv_out = Conv2d(channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2)
        self.feature_cache: FeatureCache | None = None

    # ---- stages ------------------------------------------------------------------------------
    def _embed(self, sample, timestep, timestep_cond, class_labels, added_cond_kwargs) -> torch.Tensor:
        """The per-sample embedding every resnet reads: ``(B, temb_channels)``."""
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None]
        timesteps = timestep.to(sample.device).expand(sample.shape[0])  # (B,)
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise InputError("this UNet has a class embedding: pass class_labels")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(sample.dtype)
            class_emb = self.class_embedding(class_labels).to(sample.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        if self.config.addition_embed_type == "text_time":
            emb = emb + text_time_embedding(self.add_time_proj, self.add_embedding, added_cond_kwargs, emb.dtype)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def _down(self, h: torch.Tensor, emb: torch.Tensor, cond: dict, last: int | None = None,
              last_layers: int | None = None):
        """Down blocks ``0..last`` (all when ``None``); returns ``(h, skips)``, skips shallow first.

        With ``last`` set, block ``last`` leaves out its downsampler (only deeper stages read it)
        and, with ``last_layers``, runs only its first ``last_layers`` layers.
        """
        skips = [h]
        blocks = self.down_blocks if last is None else self.down_blocks[: last + 1]
        for i, block in enumerate(blocks):
            kwargs = cond if block.has_cross_attention else {}
            if last is not None and i == last:
                kwargs = {**kwargs, "run_downsample": False, "num_layers": last_layers}
            h, res = block(h, emb, **kwargs)
            skips.extend(res)
        return h, skips

    def _mid(self, h: torch.Tensor, emb: torch.Tensor, cond: dict) -> torch.Tensor:
        if self.mid_block is None:
            return h
        return self.mid_block(h, emb, **cond) if self.mid_block.has_cross_attention else self.mid_block(h, emb)

    def _up(self, h: torch.Tensor, skips: list, emb: torch.Tensor, cond: dict, forward_size: bool,
            start: int = 0, start_layer: int = 0, store_at: int | None = None, store_layer: int = 0) -> torch.Tensor:
        """Up blocks ``start..end``, popping one skip per layer run from the end of ``skips``.

        ``start_layer``: block ``start`` begins at that layer (DeepCache's shallow path resuming).
        ``store_at`` / ``store_layer``: keep the hidden state entering that layer of that block in
        ``feature_cache.features``.
        """
        last = len(self.up_blocks) - 1
        for i in range(start, last + 1):
            block = self.up_blocks[i]
            first = start_layer if i == start else 0
            n = len(block.resnets) - first
            res, skips = tuple(skips[-n:]), skips[:-n]
            # sizes not divisible by 2**num_upsamplers: upsample to the skip's size, not 2x
            size = tuple(skips[-1].shape[2:]) if forward_size and i < last else None
            kwargs = cond if block.has_cross_attention else {}
            if i == store_at:
                if store_layer:
                    h = block(h, res[n - store_layer:], emb, stop=store_layer, **kwargs)
                self.feature_cache.features = h
                h = block(h, res[: n - store_layer], emb, upsample_size=size, start=store_layer, **kwargs)
            else:
                h = block(h, res, emb, upsample_size=size, start=first, **kwargs)
        return h

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,  # diffusers' signature; "scale" is taken by __call__ (LoRA)
        added_cond_kwargs: dict | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """``sample`` (B, C, H, W), ``timestep`` number / 0-d / (B,) / (1,), text states (B, S, D).

        ``down_block_additional_residuals`` / ``mid_block_additional_residual``: ControlNet's
        residuals, added to the skips / the mid output as in diffusers.
        """
        if down_intrablock_additional_residuals is not None:
            raise InputError("down_intrablock_additional_residuals (T2I-Adapter) is not supported")
        factor = 2 ** self.num_upsamplers
        forward_size = any(s % factor != 0 for s in sample.shape[-2:])
        cond = dict(encoder_hidden_states=encoder_hidden_states,
                    attention_mask=_mask_to_bias(attention_mask, sample.dtype),
                    encoder_attention_mask=_mask_to_bias(encoder_attention_mask, sample.dtype))
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embed(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)
        if self.encoder_hid_proj is not None:
            cond["encoder_hidden_states"] = self.encoder_hid_proj(encoder_hidden_states)
        h = self.conv_in(sample)

        cut = self._cut()  # DeepCache: None runs the whole network; "reuse" skips the deep part
        reuse = cut is not None and cut.mode == "reuse"
        h, skips = self._down(h, emb, cond, *cut.down) if reuse else self._down(h, emb, cond)
        skips = self._add_residuals(skips, down_block_additional_residuals)
        if reuse:
            h = self.feature_cache.features
        else:
            h = self._mid(h, emb, cond)
            if mid_block_additional_residual is not None:
                h = h + mid_block_additional_residual
        h = self._up(h, skips, emb, cond, forward_size, **(cut.up if cut is not None else {}))

        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        return UNet2DConditionOutput(sample=h) if return_dict else (h,)

    def _cut(self) -> "_Cut | None":
        """Where ``feature_cache`` cuts this call: None (no cache, or no mode this step), else the
        arguments of ``_down`` (reuse: the shallow path) and of ``_up`` (where to resume or store)."""
        cache = self.feature_cache
        mode = None if cache is None else cache.mode
        if mode is None:
            return None
        self._check_cache(cache)
        layer = getattr(cache, "layer", None)
        resume = len(self.up_blocks) - 1 - cache.branch
        # the up layer the shallow path resumes at: the matching up block has one layer more than
        # its down block, and the skip of down layer k feeds up layer (down layers - 1 - k)
        up_layer = 0 if layer is None else len(self.down_blocks[cache.branch].resnets) - 1 - layer
        if mode == "reuse":
            return _Cut(mode, (cache.branch, None if layer is None else layer + 1),
                        {"start": resume, "start_layer": up_layer})
        return _Cut(mode, (), {"store_at": resume, "store_layer": up_layer})

    @staticmethod
    def _add_residuals(skips: list, residuals) -> list:
        if residuals is None:
            return skips
        return [s + r for s, r in zip(skips, residuals)] + skips[len(residuals):]

    def _check_cache(self, cache) -> None:
        if cache.mode not in ("store", "reuse"):
            raise InputError(f"feature_cache.mode={cache.mode!r}; valid: 'store', 'reuse'")
        if not 0 <= cache.branch < len(self.down_blocks):
            raise InputError(f"feature_cache.branch={cache.branch} out of range 0..{len(self.down_blocks) - 1}")
        layer = getattr(cache, "layer", None)
        layers = len(self.down_blocks[cache.branch].resnets)
        if layer is not None and not -1 <= layer < layers:
            raise InputError(f"feature_cache.layer={layer} out of range -1..{layers - 1} for down block {cache.branch}")
        if cache.mode == "reuse" and cache.features is None:
            raise InputError("feature_cache.mode='reuse' before any 'store' call: no cached features")
