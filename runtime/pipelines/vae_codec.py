"""Images to latents and back through the VAE, with fp32 upcasting for fp16 VAEs that need it."""
from __future__ import annotations

import copy
import threading

import torch

from .checks import check_finite

_UPCAST_LOCK = threading.Lock()


def vae_scale_factor(vae) -> int:
    """Pixels per latent along one side: 2 ** (number of VAE down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def needs_upcast(vae) -> bool:
    """fp16 VAEs whose config says ``force_upcast`` overflow in the decoder: run those in fp32."""
    return vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))


MEMORY_SETTINGS = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")


def working_vae(pipe, vae):
    """The VAE to run: ``vae`` itself, or an fp32 copy kept on the pipeline (the shared one is untouched).

    The copy follows the VAE's slicing and tiling settings and, with CPU offload on, its offload hook.
    """
    if not needs_upcast(vae):
        return vae
    with _UPCAST_LOCK:  # why: concurrent calls must not cast the shared module in place
        cached = pipe.__dict__.get("_fp32_vae")
        if cached is None or cached[0] is not vae or (
                cached[1].device != vae.device and getattr(vae, "_offload_hook", None) is None):
            hook = getattr(vae, "_offload_hook", None)
            if hook is not None:
                vae._offload_hook = None  # why: deepcopy would copy the offload manager with it
            try:
                cached = (vae, copy.deepcopy(vae).to(torch.float32))
            finally:
                if hook is not None:
                    vae._offload_hook = hook
            pipe.__dict__["_fp32_vae"] = cached
        model = cached[1]
        for name in MEMORY_SETTINGS:
            if hasattr(vae, name):
                setattr(model, name, getattr(vae, name))
        if hasattr(vae, "_offload_hook"):
            model._offload_hook = vae._offload_hook
    return model


@torch.no_grad()
def encode_image(pipe, vae, image: torch.Tensor, generator, latent_stats: bool = False) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f); sample i uses generator i."""
    model = working_vae(pipe, vae)
    image = image.to(device=model.device, dtype=model.dtype)
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        parts = [model.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(image.shape[0])]
        latents = torch.cat(parts, dim=0)
    else:
        latents = model.encode(image).latent_dist.sample(generator)
    latents = latents.float()  # latents live in fp32 (the loop's dtype rule)
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if latent_stats and mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, device=latents.device).view(shape)
        std_t = torch.tensor(std, device=latents.device).view(shape)
        return (latents - mean_t) * vae.config.scaling_factor / std_t
    return vae.config.scaling_factor * latents


@torch.no_grad()
def decode_latents(pipe, vae, latents: torch.Tensor, where: str) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]; NaN/inf latents raise instead of decoding to black."""
    check_finite(latents, where)
    model = working_vae(pipe, vae)
    config = vae.config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:  # SDXL-style VAEs with per-channel latent statistics
        shape = (1, len(mean), 1, 1)
        mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    latents = latents.to(device=model.device, dtype=model.dtype)
    image = model.decode(latents, return_dict=False)[0]
    if not bool(torch.isfinite(image).all()):
        from runtime.models.errors import InputError

        bad = int((~torch.isfinite(image)).sum())
        raise InputError(f"{where}: the VAE decoder's output holds {bad} NaN/inf value(s) of {image.numel()} "
                         f"in {model.dtype} from finite latents" + (
                             f": {model.dtype} overflowed; run the VAE in float32 (force_upcast)"
                             if model.dtype in (torch.float16, torch.bfloat16) else ""))
    return image
