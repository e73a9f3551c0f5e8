"""A pretrained latent base: a local diffusers Stable Diffusion folder as the base of
a store's LoRA shards.

    DIR/model_index.json
    DIR/unet/           UNet2DConditionModel   the base every shard adapts (frozen)
    DIR/vae/            AutoencoderKL          images <-> latents
    DIR/text_encoder/   CLIPTextModel          prompts -> tokens (frozen)
    DIR/tokenizer/      CLIPTokenizer
    DIR/scheduler/      its noise schedule (epsilon prediction)

`cdm train --base DIR` copies these parts into STORE/pipeline/ (hard links where the
file system allows), encodes every image to the VAE's latent mean times its scaling
factor, and then builds a text-conditional LoRA store on the latents as on pixels:
one adapter per contributor on the pipeline's UNet, one density-ratio head per
contributor on noised latents and the prompt, the composed sampler in latent space,
and the VAE's decoder at the end of every request. The pipeline is owned by nobody:
forgetting a contributor deletes its adapter and its head, as in any LoRA store.

Each shard folder also holds `pytorch_lora_weights.safetensors`, the adapter in the
layout of diffusers' `save_lora_weights`, so plain diffusers loads it:
`StableDiffusionPipeline.from_pretrained(STORE/pipeline).load_lora_weights(STORE/shards/<id>)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import DataError
from .models import LOAD
from .text import TextEncoder

# part -> (the config file it must have, the diffusers/transformers classes we take)
PARTS = {
    "unet": ("config.json", ("UNet2DConditionModel",)),
    "vae": ("config.json", ("AutoencoderKL",)),
    "text_encoder": ("config.json", ("CLIPTextModel",)),
    "tokenizer": ("tokenizer_config.json", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("scheduler_config.json", None),
}
WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
LORA_FILE = "pytorch_lora_weights.safetensors"
ENCODE_BATCH = 32


def check_pipeline(folder: str | Path) -> dict:
    """What a store records of the pipeline at `folder`: its parts' classes, the
    schedule, the VAE's scaling factor and downsampling, the text encoder's width.

    Raises:
        DataError: one line naming what is missing or unsupported (not a folder, no
            model_index.json, a part, its config or safetensors weights, another
            class, v-prediction, mismatched widths).
    """
    root = Path(folder)
    what = f"--base {root}"
    if not root.is_dir():
        raise DataError(f"{what}: not a folder (a diffusers Stable Diffusion pipeline folder)")
    if not (root / "model_index.json").is_file():
        raise DataError(f"{what}: no model_index.json; not a diffusers pipeline folder "
                        "(save one with StableDiffusionPipeline.save_pretrained)")
    index = json.loads((root / "model_index.json").read_text())
    for part, (config_file, classes) in PARTS.items():
        if not (root / part / config_file).is_file():
            raise DataError(f"{what}: missing {part}/{config_file} (a Stable Diffusion folder "
                            f"has {', '.join(PARTS)})")
        named = (index.get(part) or [None, None])[-1]
        if classes and named not in classes:
            raise DataError(f"{what}: {part} is {named!r}; supported: {', '.join(classes)}")
        if part in ("unet", "vae", "text_encoder") and not any(
                (root / part / w).is_file() for w in WEIGHTS):
            raise DataError(f"{what}: missing {part}/ weights ({' or '.join(WEIGHTS)}; "
                            "save with safe_serialization)")
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    text = json.loads((root / "text_encoder" / "config.json").read_text())
    schedule = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    if schedule.get("prediction_type", "epsilon") != "epsilon":
        raise DataError(f"{what}: the scheduler predicts {schedule['prediction_type']!r}; "
                        "only epsilon-prediction pipelines are supported")
    if unet["in_channels"] != vae["latent_channels"]:
        raise DataError(f"{what}: the UNet takes {unet['in_channels']} channels, the VAE's "
                        f"latents have {vae['latent_channels']}")
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise DataError(f"{what}: the UNet cross-attends to width {unet['cross_attention_dim']}, "
                        f"the text encoder's is {text['hidden_size']}")
    return {"source": str(root.resolve()), "image_channels": vae["in_channels"],
            "latent_channels": vae["latent_channels"],
            "vae_factor": 2 ** (len(vae["block_out_channels"]) - 1),
            "scaling_factor": vae.get("scaling_factor", 0.18215),
            "schedule": {k: schedule[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                  "beta_schedule") if k in schedule}
            | {"prediction_type": "epsilon", "clip_sample": False}}


def latent_shape(info: dict, pixel_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latents' (C, h, w) of images of `pixel_shape` (C, H, W).

    Raises:
        DataError: other channels than the VAE's, or a side not divisible by its factor.
    """
    c, h, w = pixel_shape
    f = info["vae_factor"]
    if c != info["image_channels"]:
        raise DataError(f"images have {c} channel(s); the pipeline's VAE takes "
                        f"{info['image_channels']} (RGB)")
    if h % f or w % f:
        raise DataError(f"image size {h}x{w} is not divisible by {f}, the VAE's downsampling")
    return info["latent_channels"], h // f, w // f


def import_pipeline(source: str | Path, dest: Path) -> None:
    """Copy the pipeline's parts into `dest` (hard links where possible: a Stable
    Diffusion folder is gigabytes)."""
    source = Path(source)
    dest.mkdir(parents=True)
    shutil.copy2(source / "model_index.json", dest / "model_index.json")
    for part in PARTS:
        shutil.copytree(source / part, dest / part, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def text_info(folder: Path, path: str) -> dict:
    """What a store records of the pipeline's text encoder (`manifest["text"]`)."""
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    weights = next(folder / "text_encoder" / w for w in WEIGHTS
                   if (folder / "text_encoder" / w).is_file())
    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    return {"kind": "pipeline", "name": "CLIP text encoder of the base pipeline", "path": path,
            "dim": config["hidden_size"],
            "max_tokens": min(int(tokenizer.get("model_max_length", 77)),
                              config["max_position_embeddings"]),
            "weights_hash": digest.hexdigest()}


class PipelineTextEncoder(TextEncoder):
    """The pipeline's CLIP text encoder as the store's `TextEncoder`: tokens are its
    last hidden states over `max_tokens` positions, every one attended (as Stable
    Diffusion's UNet reads them), pooled is its L2-normalised pooled output (the heads'
    input)."""

    _by_folder: dict[str, PipelineTextEncoder] = {}

    def __init__(self, folder: Path, info: dict):
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.name, self.dim, self.max_tokens = info["name"], info["dim"], info["max_tokens"]
        super().__init__(CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                         CLIPTextModel.from_pretrained(folder / "text_encoder"))

    @classmethod
    def for_store(cls, folder: Path, info: dict) -> PipelineTextEncoder:
        """One encoder per pipeline folder and process."""
        key = str(Path(folder).resolve())
        with cls._shared_lock:
            if key not in cls._by_folder:
                cls._by_folder[key] = cls(Path(folder), info)
            return cls._by_folder[key]

    def _embed(self, texts):
        batch = self.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"])
        hidden = out.last_hidden_state.float()
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
        return hidden, mask, F.normalize(out.pooler_output.float(), dim=-1)


class LatentCodec:
    """The pipeline's VAE: images in [-1, 1] <-> latents (scaled by its factor)."""

    _by_folder: dict[str, LatentCodec] = {}
    _lock = threading.Lock()

    def __init__(self, folder: Path):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", **LOAD).eval()
        self.vae.requires_grad_(False)
        self.scale = float(self.vae.config.scaling_factor)
        self._run = threading.Lock()

    @classmethod
    def for_store(cls, folder: Path) -> LatentCodec:
        key = str(Path(folder).resolve())
        with cls._lock:
            if key not in cls._by_folder:
                cls._by_folder[key] = cls(Path(folder))
            return cls._by_folder[key]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, progress: bool = False, desc: str = "") -> torch.Tensor:
        """Latents of `images` (N, C, H, W) in [-1, 1]: the mean of the VAE's posterior
        (deterministic), times the scaling factor."""
        out = []
        for start in tqdm(range(0, len(images), ENCODE_BATCH), disable=not progress,
                          desc=f"VAE encode {desc}".strip(), leave=False):
            x = images[start:start + ENCODE_BATCH].float()
            with self._run:
                out.append(self.vae.encode(x).latent_dist.mean * self.scale)
        return torch.cat(out) if out else images.new_zeros((0,))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from latents."""
        vae = self.vae.to(latents.device)
        with self._run:
            return vae.decode(latents / self.scale).sample.clamp(-1, 1)


def export_lora(model: torch.nn.Module, folder: Path) -> None:
    """Write a peft LoRA UNet's adapter as diffusers' `save_lora_weights` does, into
    `folder`/LORA_FILE (what `load_lora_weights` reads)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    layers = {k.removeprefix("base_model.model."): v.contiguous()
              for k, v in get_peft_model_state_dict(model).items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=layers,
                                                     weight_name=LORA_FILE)
