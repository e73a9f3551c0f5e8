"""Model factories: the shard UNet (diffusers), the LoRA adapter config (peft) and the
noise schedule every shard in a store shares.

All shards of a store share one architecture and one forward process, so their
epsilon predictions are interchangeable terms of the mixture in `sampler.py`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from peft import LoraConfig

from .errors import DataError

DEFAULT_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8}
DEFAULT_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "prediction_type": "epsilon",
}
LORA_TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_out"]
# text-conditional shards also adapt their attention (the cross-attention reads the text)
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@contextmanager
def seeded(seed: int):
    """Run a block (e.g. module construction) with torch's global RNG seeded, then
    restore the caller's RNG state: module init draws from global state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_unet(image_shape: tuple[int, int, int], unet: dict | None = None, seed: int = 0,
              num_labels: int = 0, text_dim: int = 0) -> UNet2DModel | UNet2DConditionModel:
    """A small `UNet2DModel` for images of shape (C, H, W), initialised from `seed`;
    class-conditional (diffusers' class embedding, added to the time embedding) with
    `num_labels` > 0, so eps_theta(x_t, t, y). With `text_dim` > 0 a
    `UNet2DConditionModel` of the same widths, eps_theta(x_t, t, c): cross-attention to
    the text's tokens at the lowest resolution and in the middle block, and a
    projection of its pooled embedding added to the time embedding (text.py).

    Raises:
        DataError: if H or W is not divisible by the UNet's total downsampling.
    """
    cfg = {**DEFAULT_UNET, **(unet or {})}
    channels, height, width = image_shape
    levels = len(cfg["block_out_channels"])
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        raise DataError(
            f"image size {height}x{width} is not divisible by {factor}, the UNet's "
            f"downsampling for block_out_channels={cfg['block_out_channels']}"
        )
    common = {"sample_size": (height, width) if height != width else height,
              "in_channels": channels, "out_channels": channels,
              "block_out_channels": tuple(cfg["block_out_channels"]),
              "layers_per_block": cfg["layers_per_block"],
              "norm_num_groups": cfg["norm_num_groups"]}
    with seeded(seed):
        if text_dim:
            return UNet2DConditionModel(
                **common,
                down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
                mid_block_type="UNetMidBlock2DCrossAttn",
                cross_attention_dim=text_dim,
                attention_head_dim=4,  # diffusers' name for the number of heads
                class_embed_type="projection",
                projection_class_embeddings_input_dim=text_dim,
            )
        return UNet2DModel(
            **common,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            num_class_embeds=num_labels or None,
        )


# How every saved diffusers model of a store is loaded. diffusers' default with accelerate
# installed (peft requires it) builds the model under accelerate's init_empty_weights,
# which patches torch.nn.Module.register_parameter for the whole process while it
# loads: a model built meanwhile in another thread (an add job training beside a
# sampler reloading its heads) gets parameters on the meta device and fails. Built
# normally, then filled: a few milliseconds more for these small models.
LOAD = {"low_cpu_mem_usage": False}


def make_lora_config(rank: int = 8, attention: bool = False) -> LoraConfig:
    """LoRA on every convolution and time projection of the shard UNet (and on the
    attention projections with `attention`, for text-conditional shards)."""
    targets = LORA_TARGETS + (ATTENTION_TARGETS if attention else [])
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)


def make_noise_schedule(schedule: dict | None = None) -> DDPMScheduler:
    """The forward process q(x_t | x_0) shared by training and sampling."""
    return DDPMScheduler(**{**DEFAULT_SCHEDULE, **(schedule or {})})


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
