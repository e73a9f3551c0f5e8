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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import get_peft_model

from .data import ContributorData
from .models import DEFAULT_SCHEDULE, DEFAULT_UNET, make_lora_config, make_unet, seeded
from .training import TrainConfig, train_denoiser

KINDS = ("full", "lora")
ROUTERS = ("heads", "joint")


@dataclass(frozen=True)
class StoreConfig:
    """Everything that determines a store's models besides the data."""

    seed: int = 0
    kind: str = "full"
    unet: dict = field(default_factory=lambda: dict(DEFAULT_UNET))
    schedule: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    shard_train: TrainConfig = TrainConfig(steps=800, ema=True)
    base_train: TrainConfig = TrainConfig(steps=1200, ema=True)
    lora_train: TrainConfig = TrainConfig(steps=400, lr=5e-3, ema=True)
    lora_rank: int = 8
    classifier_train: TrainConfig = TrainConfig(steps=800, batch_size=128)
    classifier_update_steps: int = 300
    classifier_channels: tuple[int, ...] = (32, 64)
    priors: str = "size"
    router: str = "heads"
    head_train: TrainConfig = TrainConfig(steps=4000, batch_size=128)
    head_hidden: int = 128
    keep_data: bool | None = None  # None: only where the router needs it (joint)
    # A shard of R = steps_reference_images images trains its kind's configured steps
    # and any other in proportion to its images (at least min_shard_steps, or the
    # configured steps if fewer), so each image is seen about as often as by a
    # monolith trained on the union for the shards' total steps; a shard's length
    # still depends on its own data only. 154: the default data's mean contributor,
    # so the default store trains 7 x 800 shard steps in all. None: every shard the
    # configured steps (stores written before this setting).
    steps_reference_images: int | None = 154
    min_shard_steps: int = 200

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {list(KINDS)}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r}; allowed: {list(ROUTERS)}")
        if self.router == "joint" and self.keep_data is False:
            raise ValueError("router 'joint' retrains on every contributor's data at each "
                             "forget, so it needs keep_data=True")
        if self.priors not in ("size", "uniform"):
            raise ValueError(f"priors={self.priors!r}; allowed: ['size', 'uniform']")
        if self.steps_reference_images is not None and self.steps_reference_images < 1:
            raise ValueError(f"steps_reference_images={self.steps_reference_images} must be "
                             "a positive number of images (or None: fixed steps)")
        if self.min_shard_steps < 1:
            raise ValueError(f"min_shard_steps={self.min_shard_steps} must be positive")

    def shard_train_for(self, kind: str, images: int) -> TrainConfig:
        """The training settings of a `kind` shard of `images` images."""
        train = self.shard_train if kind == "full" else self.lora_train
        if self.steps_reference_images is None:
            return train
        floor = min(self.min_shard_steps, train.steps)
        steps = max(floor, round(train.steps * images / self.steps_reference_images))
        return train.with_steps(steps)

    @property
    def keeps_data(self) -> bool:
        """Whether the store keeps each contributor's images (always for `joint`)."""
        return self.router == "joint" if self.keep_data is None else self.keep_data

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StoreConfig:
        d = dict(d)
        # stores written before routers were configurable: joint classifier, data kept
        d.setdefault("router", "joint")
        d.setdefault("keep_data", True)
        d.setdefault("steps_reference_images", None)  # before: the same steps for every shard
        if "head_train" in d:
            d["head_train"] = TrainConfig(**d["head_train"])
        for key in ("shard_train", "base_train", "lora_train", "classifier_train"):
            d[key] = TrainConfig(**d[key])
        d["classifier_channels"] = tuple(d["classifier_channels"])
        return cls(**d)


def derived_seed(seed: int, *names: str) -> int:
    """A 31-bit seed from the store seed and names, independent of any ordering of
    contributors, so a shard is the same whichever others share its store."""
    key = ":".join([str(seed), *names]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def files_hash(folder: Path) -> str:
    """sha256 over the safetensors files of a saved model folder."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def train_base(images: torch.Tensor, image_shape, config: StoreConfig, scheduler: DDPMScheduler,
               device="cpu", progress=True, labels: torch.Tensor | None = None,
               num_labels: int = 0) -> tuple[UNet2DModel, float]:
    """The public base UNet of LoRA shards, trained on public data only (with its
    labels in a labelled store)."""
    seed = derived_seed(config.seed, "base")
    model = make_unet(image_shape, config.unet, seed=seed, num_labels=num_labels)
    loss = train_denoiser(model, images, scheduler, config.base_train, seed, labels=labels,
                          device=device, desc="base (public)", progress=progress)
    return model.cpu(), loss


def train_shard(data: ContributorData, kind: str, config: StoreConfig, scheduler: DDPMScheduler,
                base: UNet2DModel | None = None, device="cpu", progress=True,
                num_labels: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train one shard on `data` alone, class-conditional on `num_labels` labels when
    the data is labelled (a LoRA shard inherits its base's class embedding). Returns
    (model, metadata)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {list(KINDS)}")
    seed = derived_seed(config.seed, "shard", data.contributor_id)
    if kind == "full":
        model = make_unet(data.image_shape, config.unet, seed=seed, num_labels=num_labels)
    else:
        if base is None:
            raise ValueError("a LoRA shard needs the store's public base model")
        with seeded(seed):
            model = get_peft_model(copy.deepcopy(base), make_lora_config(config.lora_rank))
    train = config.shard_train_for(kind, len(data))
    loss = train_denoiser(model, data.images, scheduler, train, seed, labels=data.labels,
                          device=device, desc=f"shard {data.contributor_id}", progress=progress)
    meta = {"contributor_id": data.contributor_id, "kind": kind, "data_hash": data.data_hash,
            "images": len(data), "seed": seed, "steps": train.steps, "ema": train.ema,
            "final_loss": loss}
    if data.labels is not None:
        meta["labels"] = {str(k): v for k, v in data.label_counts().items()}
    return model.cpu(), meta


def save_shard(model: torch.nn.Module, meta: dict, folder: Path) -> str:
    """Save in diffusers/peft layout plus shard.json; returns the weights' hash."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "shard.json").write_text(json.dumps(meta, indent=2) + "\n")
    return files_hash(folder)
