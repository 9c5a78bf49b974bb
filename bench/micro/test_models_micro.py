"""Per-function timings, ours against diffusers/transformers on the same weights: UNet step, VAE decode,
text encode, one attention layer. Outputs are checked equal first, so a fast wrong path cannot win."""
from __future__ import annotations

import pytest
import torch

from .conftest import IMPLS, run

TOL = 1e-4  # fp32, same weights and inputs


@pytest.mark.parametrize("impl", IMPLS)
def test_unet_step(benchmark, pipes, unet_inputs, rounds, impl):
    benchmark.group = "unet step (batch 2)"
    unet = pipes[impl].unet
    sample, t, context = unet_inputs
    out = run(benchmark, rounds, lambda: unet(sample, t, encoder_hidden_states=context).sample)
    with torch.no_grad():
        ref = pipes["diffusers"].unet(sample, t, encoder_hidden_states=context).sample
    assert (out - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_vae_decode(benchmark, pipes, unet_inputs, rounds, impl):
    benchmark.group = "vae decode (batch 1)"
    vae = pipes[impl].vae
    latents = unet_inputs[0][:1]
    out = run(benchmark, rounds, lambda: vae.decode(latents).sample)
    with torch.no_grad():
        ref = pipes["diffusers"].vae.decode(latents).sample
    assert (out - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_text_encode(benchmark, pipes, rounds, impl):
    benchmark.group = "text encode (batch 2, 77 tokens)"
    tok = pipes["diffusers"].tokenizer
    ids = tok(["a red circle on a blue background", ""], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    encoder = pipes[impl].text_encoder
    out = run(benchmark, rounds, lambda: encoder(ids)[0])
    with torch.no_grad():
        ref = pipes["diffusers"].text_encoder(ids)[0]
    assert (out - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, pipes, unet_inputs, rounds, impl):
    """The first self-attention of the UNet at the full latent resolution (the costliest one)."""
    benchmark.group = "self-attention, first block"
    attn = pipes[impl].unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    sample = unet_inputs[0]
    channels = attn.to_q.in_features
    tokens = torch.randn(sample.shape[0], sample.shape[2] * sample.shape[3], channels,
                         generator=torch.Generator().manual_seed(1))  # (B, H*W, C)
    out = run(benchmark, rounds, lambda: attn(tokens))
    with torch.no_grad():
        ref = pipes["diffusers"].unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1(tokens)
    assert (out - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())
