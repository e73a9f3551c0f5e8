"""A tiny Stable Diffusion pipeline with random weights, built and saved locally (nothing
downloaded): what the tests point `cdm train --base` at in place of real weights.

Its CLIP tokenizer is byte-level BPE without merges: each character is a token (the
256 byte symbols and their end-of-word forms), so any text tokenizes.
`python tests/tiny_pipeline.py DIR` writes one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def make_tiny_pipeline(folder: str | Path, seed: int = 0, max_tokens: int = 32) -> Path:
    """Save a randomly initialised StableDiffusionPipeline at `folder`: a 2-level UNet
    (cross-attention width 32), a 2-level VAE (16x16 RGB <-> 4x8x8 latents), a 2-layer
    CLIP text encoder and its tokenizer, and SD's noise schedule. Returns `folder`."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from tokenizers import pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_tokens,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"]))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


if __name__ == "__main__":
    print(make_tiny_pipeline(sys.argv[1]))
