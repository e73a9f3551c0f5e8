"""One shard: a denoiser trained on one contributor's data only.

`full`: a `UNet2DModel` trained from scratch, saved by diffusers' `save_pretrained`
(config.json + diffusion_pytorch_model.safetensors). `lora`: a peft LoRA adapter on a
base UNet trained only on public data, saved by peft's `save_pretrained`
(adapter_config.json + adapter_model.safetensors). Both folders also hold
`shard.json` (contributor id, data hash, seed, steps, final loss).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import get_peft_model

from .config import StoreConfig
from .data import ContributorData
from .files import files_hash
from .models import make_lora_config, make_unet, seeded
from .pipeline import export_lora
from .settings import SHARD_KINDS
from .text import ENCODER, Captions, TextEncoder
from .training import train_denoiser


def derived_seed(seed: int, *names: str) -> int:
    """A 31-bit seed from the store seed and names, independent of any ordering of
    contributors, so a shard is the same whichever others share its store."""
    key = ":".join([str(seed), *names]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def train_base(images: torch.Tensor, image_shape, config: StoreConfig, scheduler: DDPMScheduler,
               device="cpu", progress=True, labels: torch.Tensor | None = None,
               num_labels: int = 0, captions: list[str] | None = None) -> tuple[UNet2DModel, float]:
    """The public base UNet (of LoRA shards, and where full shards start with
    shard_init 'base'), trained on public data only (with its labels in a labelled
    store, its captions in a text-conditional one)."""
    seed = derived_seed(config.seed, "base")
    text = None if captions is None else Captions(captions, TextEncoder.shared())
    model = make_unet(image_shape, config.unet, seed=seed, num_labels=num_labels,
                      text_dim=ENCODER["dim"] if text is not None else 0)
    loss = train_denoiser(model, images, scheduler, config.base_train, seed, labels=labels,
                          text=text, device=device, desc="base (public)", progress=progress)
    return model.cpu(), loss


def train_shard(data: ContributorData, kind: str, config: StoreConfig, scheduler: DDPMScheduler,
                base: UNet2DModel | None = None, device="cpu", progress=True,
                num_labels: int = 0, encoder: TextEncoder | None = None
                ) -> tuple[torch.nn.Module, dict]:
    """Train one shard on `data` alone, class-conditional on `num_labels` labels when
    the data is labelled (a LoRA shard inherits its base's class embedding), on its
    captions encoded by `encoder` in a text-conditional store (the store's
    `text_encoder()`). Returns (model, metadata)."""
    text = encoder is not None
    if text and data.captions is None:
        raise ValueError(f"contributor {data.contributor_id!r} has no captions")
    if kind not in SHARD_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {list(SHARD_KINDS)}")
    seed = derived_seed(config.seed, "shard", data.contributor_id)
    from_base = config.needs_base(kind)
    if not from_base:
        model = make_unet(data.image_shape, config.unet, seed=seed, num_labels=num_labels,
                          text_dim=encoder.dim if text else 0)
    elif base is None:
        raise ValueError(f"a {kind!r} shard of this store starts from the public base model; "
                         "none was given")
    elif kind == "full":
        model = copy.deepcopy(base)
    else:
        with seeded(seed):
            model = get_peft_model(copy.deepcopy(base), make_lora_config(config.lora_rank, text))
    train = config.shard_train_for(kind, len(data))
    captions = Captions(data.captions, encoder) if text else None
    loss = train_denoiser(model, data.images, scheduler, train, seed,
                          labels=None if text else data.labels, text=captions,
                          device=device, desc=f"shard {data.contributor_id}", progress=progress)
    meta = {"contributor_id": data.contributor_id, "kind": kind, "data_hash": data.data_hash,
            "images": len(data), "seed": seed, "steps": train.steps, "ema": train.ema,
            "precision": train.resolved_precision(device), "final_loss": loss}
    if kind == "full" and from_base:
        meta["init"] = "base"
    if text:
        meta["captions"] = len(set(data.captions))
        if captions.truncated:  # read up to the encoder's limit (text.Captions)
            meta["captions_truncated"] = captions.truncated
    elif data.labels is not None:
        meta["labels"] = {str(k): v for k, v in data.label_counts().items()}
    if data.licence is not None:
        meta["licence"] = dict(data.licence)
    return model.cpu(), meta


def save_shard(model: torch.nn.Module, meta: dict, folder: Path, diffusers_lora: bool = False) -> str:
    """Save in diffusers/peft layout plus shard.json (with `diffusers_lora`, a LoRA
    shard also as diffusers' `load_lora_weights` reads it: pipeline.py); returns the
    weights' hash."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if diffusers_lora:
        export_lora(model, folder)
    (folder / "shard.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files_hash(folder)
