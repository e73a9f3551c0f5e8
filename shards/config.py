"""`StoreConfig`: everything that determines a store's models besides the data.

A diffusers `ConfigMixin`: the constructor's arguments are the config (JSON-able: the
training settings are stored as dicts), `from_config` rebuilds it, and a store keeps
it in its manifest. A key that a stored config lacks takes its value from `LEGACY`,
what stores written before that setting existed did, not from today's default, so an
old store opens with the behaviour it was built with.
"""

from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin

from .models import DEFAULT_SCHEDULE, DEFAULT_UNET
from .settings import PRIORS, ROUTERS, SHARD_INITS, SHARD_KINDS
from .training import TrainConfig

TRAINING = {  # the default optimisation of each trained part
    "shard_train": TrainConfig(steps=800, ema=True),
    "base_train": TrainConfig(steps=1200, ema=True),
    "lora_train": TrainConfig(steps=400, lr=5e-3, ema=True),
    "classifier_train": TrainConfig(steps=800, batch_size=128),
    "head_train": TrainConfig(steps=4000, batch_size=128),
}
# What `defaults_for` changes for images of 16 pixels a side or more (the studios'
# 16x16 or 32x32 RGB emoji): a wider three-level UNet (1.06M parameters; the digits'
# [16, 32] has 164k), 1,200 steps for a shard of 1,500 images (a studio) and any other
# in proportion. Measured on 2 CPU cores, batch 64: 0.19 s a training step at 16x16,
# 0.78 s at 32x32 (docs/studios.md). With public data, full shards start from the
# public base (1,200 steps on it): the studios' shards then reach FD 2.58 on average
# to their own held-out drawings instead of 5.77 from scratch at the same steps, every
# studio better (benchmarks/shard_init.py, docs/studios.md).
# Their heads read a trunk of 64 public principal directions and are 64 wide: at 128
# contributors the router costs 0.07x one shard's pass instead of 0.30x, with the same
# FD of composed samples (benchmarks/router_trunk.py, docs/performance.md).
LARGE_IMAGE_SIDE = 16
LARGE_IMAGES = {
    "unet": {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8},
    "head_trunk": 64, "head_hidden": 64,
    "shard_train": TrainConfig(steps=1200, ema=True).to_dict(),
    "steps_reference_images": 1500,
}


def defaults_for(image_shape: tuple[int, int, int], public: bool = False) -> dict:
    """StoreConfig settings chosen from the images' (C, H, W): {} for small images
    (the digits' defaults), `LARGE_IMAGES` from LARGE_IMAGE_SIDE pixels a side, and
    with `public` data there, shards that start from the public base."""
    if min(image_shape[1:]) < LARGE_IMAGE_SIDE:
        return {}
    return {**LARGE_IMAGES, "shard_init": "base"} if public else dict(LARGE_IMAGES)


# keys absent from configs of stores written before they existed, with those stores'
# behaviour: a joint classifier with every contributor's data kept, and the same steps
# for every shard
LEGACY = {"router": "joint", "keep_data": True, "steps_reference_images": None,
          "shard_init": "scratch"}


class StoreConfig(ConfigMixin):
    """Settings of a store's models.

    Args:
        seed: every model's seed derives from it and the model's name (`derived_seed`).
        kind: "full" (a UNet per contributor) or "lora" (an adapter on a public base).
        unet, schedule: diffusers UNet2DModel and DDPMScheduler settings.
        shard_train, base_train, lora_train, classifier_train, head_train: TrainConfig
            (or its dict) of each trained part.
        lora_rank: the rank of LoRA shards.
        classifier_update_steps: fine-tuning steps of the joint classifier at an add.
        classifier_channels: the joint classifier's widths.
        priors: "size" (lambda_i proportional to |D_i|) or "uniform".
        router: "heads" or "joint" (shards/router.py).
        head_hidden: the width of a density-ratio head.
        head_trunk: F > 0: every head reads the pooled image's projection on the
            public data's top F principal directions (shards/trunk.py; at most as many
            as public images), so the heads' cost barely grows with the number of
            contributors; 0 (or F no smaller than the pooled image): heads read the
            pooled pixels.
        keep_data: keep each contributor's images in the store; None: only where the
            router needs them (joint).
        steps_reference_images: a shard of R images trains its kind's configured steps
            and any other in proportion to its images (at least `min_shard_steps`, or
            the configured steps if fewer), so each image is seen about as often as by
            a monolith trained on the union for the shards' total steps; a shard's
            length still depends on its own data only. 154: the default data's mean
            contributor, so the default store trains 7 x 800 shard steps in all.
            None: every shard the configured steps.
        min_shard_steps: the floor of proportional lengths.
        shard_init: where a full shard's training starts: "scratch" (random weights)
            or "base" (a copy of the public base, trained on public data only, as LoRA
            shards' base is: what every shard learns from the shared data it need not
            learn alone; forgetting a contributor still deletes all it left).

    Raises:
        ValueError: a name not allowed, router "joint" without kept data, a
            non-positive reference size or floor.
    """

    config_name = "store_config.json"

    def __init__(self, seed: int = 0, kind: str = "full", unet: dict | None = None,
                 schedule: dict | None = None, shard_train: TrainConfig | dict | None = None,
                 base_train: TrainConfig | dict | None = None,
                 lora_train: TrainConfig | dict | None = None, lora_rank: int = 8,
                 classifier_train: TrainConfig | dict | None = None,
                 classifier_update_steps: int = 300,
                 classifier_channels: tuple[int, ...] = (32, 64), priors: str = "size",
                 router: str = "heads", head_train: TrainConfig | dict | None = None,
                 head_hidden: int = 128, head_trunk: int = 0, keep_data: bool | None = None,
                 steps_reference_images: int | None = 154, min_shard_steps: int = 200,
                 shard_init: str = "scratch"):
        given = {"shard_train": shard_train, "base_train": base_train, "lora_train": lora_train,
                 "classifier_train": classifier_train, "head_train": head_train}
        trains = {name: _train(value, TRAINING[name]) for name, value in given.items()}
        for name, value, allowed in (("kind", kind, SHARD_KINDS), ("router", router, ROUTERS),
                                     ("priors", priors, PRIORS),
                                     ("shard_init", shard_init, SHARD_INITS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; allowed: {list(allowed)}")
        if router == "joint" and keep_data is False:
            raise ValueError("router 'joint' retrains on every contributor's data at each "
                             "forget, so it needs keep_data=True")
        if steps_reference_images is not None and steps_reference_images < 1:
            raise ValueError(f"steps_reference_images={steps_reference_images} must be "
                             "a positive number of images (or None: fixed steps)")
        if head_trunk < 0:
            raise ValueError(f"head_trunk={head_trunk} must be 0 (no trunk) or a number of features")
        if min_shard_steps < 1:
            raise ValueError(f"min_shard_steps={min_shard_steps} must be positive")
        self.register_to_config(
            seed=seed, kind=kind, unet=dict(unet or DEFAULT_UNET),
            schedule=dict(schedule or DEFAULT_SCHEDULE),
            **{name: train.to_dict() for name, train in trains.items()},
            lora_rank=lora_rank, classifier_update_steps=classifier_update_steps,
            classifier_channels=list(classifier_channels), priors=priors, router=router,
            head_hidden=head_hidden, head_trunk=head_trunk, keep_data=keep_data,
            steps_reference_images=steps_reference_images, min_shard_steps=min_shard_steps,
            shard_init=shard_init)
        self.seed, self.kind, self.router, self.priors = seed, kind, router, priors
        self.unet, self.schedule = dict(self.config.unet), dict(self.config.schedule)
        self.shard_train, self.base_train = trains["shard_train"], trains["base_train"]
        self.lora_train, self.classifier_train = trains["lora_train"], trains["classifier_train"]
        self.head_train = trains["head_train"]
        self.lora_rank, self.head_hidden, self.head_trunk = lora_rank, head_hidden, head_trunk
        self.classifier_update_steps = classifier_update_steps
        self.classifier_channels = tuple(classifier_channels)
        self.keep_data = keep_data
        self.steps_reference_images, self.min_shard_steps = steps_reference_images, min_shard_steps
        self.shard_init = shard_init

    def needs_base(self, kind: str | None = None) -> bool:
        """Whether shards of `kind` (default: the store's) start from the public base."""
        return (kind or self.kind) == "lora" or self.shard_init == "base"

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
        """The config as stored (JSON-able)."""
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, stored: dict) -> StoreConfig:
        """A stored config; keys it lacks take their `LEGACY` values."""
        return cls.from_config({**LEGACY, **stored})

    def replace(self, **changes) -> StoreConfig:
        """A copy with `changes` applied (checked as the constructor checks)."""
        return type(self).from_config({**self.to_dict(), **changes})

    def __eq__(self, other) -> bool:
        return isinstance(other, StoreConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable by ConfigMixin's rules: compared by value, never hashed

    def __repr__(self) -> str:
        return f"StoreConfig({self.to_dict()})"


def _train(value: TrainConfig | dict | None, default: TrainConfig) -> TrainConfig:
    if value is None:
        return default
    return value if isinstance(value, TrainConfig) else TrainConfig(**value)
