"""The calls a pipeline's networks will make, recorded without computing anything (measured dispatch, dispatch.py).

Each UNet and VAE of the pipeline is built again from its config on the meta device (a "twin": no
weights, no memory, no compute, and none of the passes' slots, so what it records is the eager
network's calls) and called once on meta inputs of the representative size: the pipeline's default
(``default_size()``, else the UNet's ``sample_size`` times the VAE's factor), or the ``height`` and
``width`` asked for. Recorders on the twin note, by the module's name in its model:

- ``attention``: each attention backend call, ``(q shape, k shape, masked)`` on ``(B, H, T, D)``;
- ``conv``: each ``Conv2d`` call, ``(x shape, add given)`` (``add``: a ResNet block's residual);
- ``upsample``: each ``Upsample2D`` call without ``output_size``, its input's shape;
- ``geglu``: each ``GEGLU`` call, its input's shape.

The inputs are those the pipeline gives: the conditional UNet in a guided batch of 2 with 77 text
tokens (SDXL's pooled embedding and size ids too), the unconditional one in a batch of 1, the VAE's
decoder on one latent and, for pipelines that take an ``image``, its encoder on one image. Text
encoders are not probed (their causal mask leaves attention to SDPA; they have no GEGLU or 3x3 conv),
nor other networks: their modules keep what they run. A twin that cannot be built or called is
recorded in ``failed`` with the error, and its modules likewise keep what they run.
"""
from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .components import pipeline_models

KINDS = ("attention", "conv", "upsample", "geglu")


@dataclass
class Calls:
    """Recorded calls by kind, then by ``(model name, module name)``; size is the image size probed."""

    size: tuple[int, int]
    calls: dict[str, dict[tuple[str, str], list]] = field(default_factory=lambda: {k: defaultdict(list) for k in KINDS})
    probed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def of(self, kind: str, model: str, name: str) -> list:
        return self.calls[kind].get((model, name), [])

    def record(self, kind: str, model: str, name: str, call) -> None:
        seen = self.calls[kind][(model, name)]
        if call not in seen:
            seen.append(call)


def image_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """The image size the pipeline runs by default, with ``height`` / ``width`` where given."""
    default = getattr(pipe, "default_size", None)
    if callable(default):
        h, w = default()
    else:
        unet = pipeline_models(pipe).get("unet")
        size = getattr(getattr(unet, "config", None), "sample_size", None) or 64
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if "vae" in pipeline_models(pipe):
            h, w = h * _vae_factor(pipe), w * _vae_factor(pipe)
    return int(height or h), int(width or w)


def _vae_factor(pipe) -> int:
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor:
        return int(factor)
    vae = pipeline_models(pipe).get("vae")
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def _twin(model):
    from runtime.models.meta_build import skip_init_on_meta

    with torch.device("meta"), skip_init_on_meta():
        twin = type(model).from_config(dict(model.config))
    for flag in ("use_tiling", "use_slicing"):  # the VAE's memory controls change the calls
        if hasattr(model, flag):
            setattr(twin, flag, getattr(model, flag))
    return twin.eval().requires_grad_(False)


def _instrument(twin, model_name: str, calls: Calls) -> list:
    """Recorders on the twin's modules (its own, thrown away after): backends wrapped, pre-hooks."""
    from runtime.models.attention import sdpa_backend
    from runtime.models.layers import Conv2d
    from runtime.models.resnet import Upsample2D
    from runtime.models.transformer_2d import GEGLU

    handles = []
    for name, module in twin.named_modules():
        if hasattr(module, "backend"):
            def backend(q, k, v, mask=None, _name=name):
                calls.record("attention", model_name, _name, (tuple(q.shape), tuple(k.shape), mask is not None))
                return sdpa_backend(q, k, v, mask)

            module.backend = backend
        elif isinstance(module, Conv2d):
            def conv_hook(m, args, kwargs, _name=name):
                add = kwargs.get("add", args[1] if len(args) > 1 else None)
                calls.record("conv", model_name, _name, (tuple(args[0].shape), add is not None))

            handles.append(module.register_forward_pre_hook(conv_hook, with_kwargs=True))
        elif isinstance(module, Upsample2D):
            def up_hook(m, args, kwargs, _name=name):
                size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
                if size is None:
                    calls.record("upsample", model_name, _name, tuple(args[0].shape))

            handles.append(module.register_forward_pre_hook(up_hook, with_kwargs=True))
        elif isinstance(module, GEGLU):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, _name=name: calls.record("geglu", model_name, _name, tuple(args[0].shape))))
    return handles


def _text_tokens(pipe) -> int:
    encoder = pipeline_models(pipe).get("text_encoder")
    return int(getattr(getattr(encoder, "config", None), "max_position_embeddings", 77) or 77)


def _unet_call(pipe, unet, size):
    """The conditional UNet's call in a guided denoising step (batch 2)."""
    config, meta = unet.config, {"device": "meta"}
    h, w = size[0] // _vae_factor(pipe), size[1] // _vae_factor(pipe)
    batch = 2  # classifier-free guidance: the unconditional and conditional halves in one call
    kwargs = {"encoder_hidden_states": torch.empty(batch, _text_tokens(pipe), config.cross_attention_dim, **meta)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size ids
        encoder_2 = pipeline_models(pipe).get("text_encoder_2")
        ids = 6
        pooled = getattr(getattr(encoder_2, "config", None), "projection_dim", None)
        if pooled:
            ids = (config.projection_class_embeddings_input_dim - pooled) // config.addition_time_embed_dim
        pooled = config.projection_class_embeddings_input_dim - ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, **meta),
                                       "time_ids": torch.empty(batch, ids, **meta)}
    if config.time_cond_proj_dim is not None:  # LCM's guidance embedding
        kwargs["timestep_cond"] = torch.empty(batch, config.time_cond_proj_dim, **meta)
    sample = torch.empty(batch, config.in_channels, h, w, **meta)
    return lambda twin: twin(sample, torch.tensor([500], **meta), **kwargs)


def _calls_for(pipe, name: str, model, size):
    """How to call the twin of ``model`` as the pipeline does, or None for networks not probed."""
    from runtime.models.unet_2d import UNet2DModel
    from runtime.models.unet_2d_condition import UNet2DConditionModel
    from runtime.models.vae import AutoencoderKL

    meta = {"device": "meta"}
    if isinstance(model, UNet2DConditionModel):
        return _unet_call(pipe, model, size)
    if isinstance(model, UNet2DModel):
        sample = torch.empty(1, model.config.in_channels, *size, **meta)
        return lambda twin: twin(sample, torch.tensor([500], **meta))
    if isinstance(model, AutoencoderKL):
        f = _vae_factor(pipe)
        z = torch.empty(1, model.config.latent_channels, size[0] // f, size[1] // f, **meta)
        takes_image = "image" in inspect.signature(type(pipe).__call__).parameters
        image = torch.empty(1, model.config.in_channels, *size, **meta)

        def call(twin):
            twin.decode(z)
            if takes_image:
                twin.encode(image)

        return call
    return None


def probe_calls(pipe, height: int | None = None, width: int | None = None) -> Calls:
    """Record the calls of the pipeline's UNets and VAEs at the image size (see the module docstring)."""
    size = image_size(pipe, height, width)
    calls = Calls(size)
    for name, model in pipeline_models(pipe).items():
        run = _calls_for(pipe, name, model, size)
        if run is None:
            continue
        try:
            twin = _twin(model)
            handles = _instrument(twin, name, calls)
            try:
                with torch.inference_mode():
                    run(twin)
            finally:
                for h in handles:
                    h.remove()
            calls.probed.append(name)
        except Exception as e:  # noqa: BLE001 (a network we cannot probe keeps what it runs)
            calls.failed[name] = f"{type(e).__name__}: {e}"
    return calls
