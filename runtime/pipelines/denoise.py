"""The one denoising loop every pipeline runs, with small hooks for what differs between tasks.

Per step: (duplicate for guidance) -> scheduler.scale_model_input -> [model_input hook] ->
announce the step -> UNet -> guidance -> scheduler.step -> [after_step hook] -> callback.
Where the UNet's ``guidance_gate`` says so (TGATE after its gate), a guided step runs the
conditional half of the batch alone and takes its prediction as is.
The Python timestep values come from one ``timesteps.tolist()`` before the loop: nothing in the
loop calls ``.item()`` or searches the schedule (docs/ARCHITECTURE.md §3).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch


def step_kwargs(scheduler, generator, eta: float) -> dict:
    """``eta`` and ``generator`` for schedulers whose ``step`` takes them (DDIM, ancestral, SDE)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Match the guided prediction's std to the text prediction's (Lin et al. 2023, §3.4)."""
    dims = list(range(1, noise_text.ndim))
    rescaled = noise_cfg * (noise_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guide(noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on a (2B, ...) prediction ordered [unconditional, conditional]."""
    uncond, text = noise_pred.chunk(2)
    guided = uncond + guidance_scale * (text - uncond)
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, text, guidance_rescale)
    return guided


def conditional_half(value, batch: int):
    """``value`` with every tensor of ``2 * batch`` rows cut to its second (conditional) half."""
    if torch.is_tensor(value):
        return value[batch:] if value.ndim and value.shape[0] == 2 * batch else value
    if isinstance(value, dict):
        return {k: conditional_half(v, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(conditional_half(v, batch) for v in value)
    return value


def _finite(x: torch.Tensor, what: str, index: int, count: int, timestep) -> None:
    """NaN/inf mid-loop is an error naming the step and the component, not a black image later."""
    if not bool(torch.isfinite(x).all()):
        from runtime.models.errors import InputError

        bad = int((~torch.isfinite(x)).sum())
        hint = " (fp16/bf16 overflow? try dtype=torch.float32)" if x.dtype in (torch.float16, torch.bfloat16) else ""
        raise InputError(f"step {index + 1} of {count} (timestep {timestep}): {what} holds {bad} NaN/inf "
                         f"value(s) of {x.numel()} ({x.dtype}){hint}")


def denoise(
    pipe,
    scheduler,
    state: dict,
    timesteps: torch.Tensor,
    num_inference_steps: int,
    *,
    do_cfg: bool,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    extra_step_kwargs: dict | None = None,
    unet_kwargs: Callable[[dict], dict] = lambda state: {},
    model_input: Callable[[dict, torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[int, dict], None] | None = None,
    callback_on_step_end=None,
    callback_tensor_inputs=("latents",),
) -> torch.Tensor:
    """Run the loop over ``timesteps``; ``state['latents']`` is updated in place and returned."""
    unet = pipe.unet
    extra_step_kwargs = extra_step_kwargs or {}
    values = timesteps.tolist()  # the only host sync of the schedule: Python timesteps for the step context
    count = len(values)
    warmup = count - num_inference_steps * scheduler.order
    announce = getattr(unet, "announce_step", None)
    unet_dtype = unet.dtype
    gate = getattr(unet, "guidance_gate", None) if do_cfg else None
    try:
        with pipe.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                latents = state["latents"]
                x = torch.cat([latents] * 2) if do_cfg else latents  # (2B, C, h, w) with guidance
                x = scheduler.scale_model_input(x, t)
                if model_input is not None:
                    x = model_input(state, x)
                kwargs = unet_kwargs(state)
                guided = do_cfg and not (gate is not None and gate(i, count))
                if do_cfg and not guided:  # the conditional half alone, unguided
                    x, kwargs = x[len(latents):], conditional_half(kwargs, len(latents))
                if announce is not None:
                    announce(i, count, values[i], guided)
                # dtype rule: the UNet runs in its own dtype; latents and scheduler math stay in theirs (fp32)
                noise_pred = unet(x.to(unet_dtype), t, return_dict=False, **kwargs)[0]
                _finite(noise_pred, "the UNet's noise prediction", i, count, values[i])
                noise_pred = noise_pred.to(latents.dtype)
                if guided:
                    noise_pred = guide(noise_pred, guidance_scale, guidance_rescale)
                state["latents"] = scheduler.step(noise_pred, t, latents, return_dict=False, **extra_step_kwargs)[0]
                _finite(state["latents"], f"the latents after {type(scheduler).__name__}.step", i, count, values[i])
                if after_step is not None:
                    after_step(i, state)
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(pipe, i, t, {k: state.get(k) for k in callback_tensor_inputs})
                    for key, value in (outputs or {}).items():
                        if key in state:
                            state[key] = value
                if i == count - 1 or (i + 1 > warmup and (i + 1) % scheduler.order == 0):
                    bar.update()
    finally:
        if hasattr(unet, "clear_step"):
            unet.clear_step()
    return state["latents"]
