"""Helpers of the LoRA tests: LoRA files written by diffusers + peft, the two pipelines, latents."""
from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "downsamplers.0.conv",
                "upsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
STEPS = 3
PROMPT = "a red circle on a blue square"


def _quiet():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()


def make_lora(pipe_folder: Path, out: Path, *, seed: int, r: int, alpha: float, unet_targets=UNET_TARGETS,
              te_targets=TE_TARGETS, te2: bool = False, metadata: bool = True, b_scale: float = 0.5) -> Path:
    """A diffusers-written LoRA folder (``pytorch_lora_weights.safetensors``) for the pipeline in ``pipe_folder``."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    _quiet()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipe_folder))
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=unet_targets)
    pipe.unet.add_adapter(unet_config)
    layers, meta = {"unet_lora_layers": None}, {}
    encoders = [("text_encoder", pipe.text_encoder)] + ([("text_encoder_2", pipe.text_encoder_2)] if te2 else [])
    te_config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=te_targets)
    for name, encoder in encoders:
        if te_targets:
            inject_adapter_in_model(te_config, encoder)
    with torch.no_grad():  # milder adapters than peft's random init: images stay images
        for model in [pipe.unet] + [e for _, e in encoders]:
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.mul_(b_scale)
    layers["unet_lora_layers"] = get_peft_model_state_dict(pipe.unet)
    if metadata:
        meta["unet_lora_adapter_metadata"] = unet_config.to_dict()
    for name, encoder in encoders:
        if te_targets:
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
            if metadata:
                meta[f"{name}_lora_adapter_metadata"] = te_config.to_dict()
    pipe.save_lora_weights(str(out), **layers, **meta)
    return out


def lora_file(folder: Path) -> Path:
    return folder / "pytorch_lora_weights.safetensors"


def reference(folder, cls_name: str = "StableDiffusionPipeline"):
    """diffusers' pipeline (the parity reference), progress bar off."""
    import diffusers

    _quiet()
    pipe = getattr(diffusers, cls_name).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(folder, cls_name: str = "StableDiffusionPipeline"):
    import runtime

    pipe = getattr(runtime, cls_name).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps: int = STEPS, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("output_type", "latent")
    out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return out.images


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    diff = float((a.float() - b.float()).abs().max())
    assert diff <= tol, f"max abs difference {diff} > {tol}"
    return diff
