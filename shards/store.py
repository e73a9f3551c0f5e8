"""The shard store: a folder of shards, their router and the registry of who is live.

    STORE/
      manifest.json                  the registry (registry.py); source of truth
      schedule/scheduler_config.json the shared forward process (diffusers)
      base/                          public base UNet (LoRA stores only)
      shards/<id>/                   config + safetensors + shard.json
      router/<id>/                   the contributor's density-ratio head (router `heads`)
      reference/images.safetensors   public reference data of the heads (owned by nobody),
                                     with its labels in a labelled store
      reference/trunk/               the heads' shared trunk fit on it (head_trunk > 0)
      classifier/v<NNNN>/            joint classifier (router `joint`); the manifest names one
      data/<id>/images.safetensors   the contributor's data (and labels), only with keep_data

A labelled store (its contributors' folders hold labels; `num_labels` in the manifest,
fixed when the store is created) has class-conditional shards and router, and every
contributor's entry lists its label counts; a contributor added later must be
labelled, with labels below `num_labels`.

`ShardStore` is the registry (registry.py) with what is built from it: the shards as
models, the router, the composed sampler; building and adding are in builder.py,
forgetting in forgetting.py. Several processes (service workers, the CLI) may open one
store: every change goes through the registry's locks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import PeftModel
from safetensors.torch import load as safetensors_load

from . import builder, forgetting
from .adapters import read_adapter
from .bank import ShardBank
from .config import StoreConfig
from .data import ContributorData
from .errors import StoreError
from .files import read_verified
from .models import LOAD, pick_device
from .registry import ShardRegistry
from .router import RouterModel
from .sampler import ComposedSampler, compose
from .settings import LORA_BANKS, env_int, env_str


class ShardStore(ShardRegistry):
    """A store on disk. `ShardStore.create` builds a new one, `ShardStore.open` opens
    an existing one."""

    # ---------------------------------------------------------------- writing
    @classmethod
    def create(cls, root: str | Path, datasets: list[ContributorData],
               config: StoreConfig | None = None, public: torch.Tensor | None = None,
               device: str | None = None, progress: bool = True,
               public_labels: torch.Tensor | None = None, workers: int = 1,
               public_captions: list[str] | None = None, text: bool = False,
               pipeline: str | Path | None = None) -> ShardStore:
        """Train one shard per contributor and the router; write a new store at `root`
        (`builder.build_store`: its errors; `workers` processes train the shards;
        `text`: a text-conditional store on the contributors' captions; `pipeline`: a
        local Stable Diffusion folder whose UNet the shards adapt, in its latent space)."""
        builder.build_store(root, datasets, config or StoreConfig(), public, public_labels,
                            device, progress, workers, public_captions, text, pipeline)
        return cls.open(root)

    def add(self, data: ContributorData, kind: str | None = None, public: torch.Tensor | None = None,
            device: str | None = None, progress: bool = True) -> dict:
        """Add a contributor: its shard and its part of the router; nothing else is
        retrained except a joint classifier (`builder.add_contributor`: its errors).
        Returns the new manifest entry."""
        return builder.add_contributor(self, data, kind, device, progress)

    def check_add(self, data: ContributorData, kind: str | None = None) -> None:
        """Raise what `add` would refuse `data` for, without training anything."""
        builder.check_add(self, data, kind)

    def exclude(self, contributor_id: str, requested_by: dict | None = None) -> dict:
        """Stage 1 of forgetting (`forgetting.exclude`). Returns the entry."""
        return forgetting.exclude(self, contributor_id, requested_by)

    def purge_plan(self, contributor_id: str) -> dict:
        """The audit record a purge of the excluded contributor will return."""
        return forgetting.purge_plan(self, contributor_id)

    def purge(self, contributor_id: str, device: str | None = None, progress: bool = False) -> dict:
        """Stage 2 of forgetting (`forgetting.purge`). Returns the audit record."""
        return forgetting.purge(self, contributor_id, device, progress)

    def forget(self, contributor_id: str, device: str | None = None) -> dict:
        """Both stages at once, for library callers: exclude, then purge. Returns the
        purge's audit record."""
        self.exclude(contributor_id)
        return self.purge(contributor_id, device)

    def cleanup_orphans(self) -> list[str]:
        """Delete folders the manifest does not name (`forgetting.cleanup_orphans`)."""
        return forgetting.cleanup_orphans(self)

    # ---------------------------------------------------------------- loading
    def load_router(self) -> RouterModel:
        """The live router (every live contributor's head, or the joint classifier)."""
        return self.router.load(self)

    def router_fingerprint(self, coalition) -> dict:
        """What the router restricted to S is made of, and whose data shaped it."""
        return self.router.fingerprint(self, coalition)

    def load_shard(self, contributor_id: str, entry: dict | None = None) -> UNet2DModel:
        """One live shard (or the shard of `entry`) as a plain UNet (a LoRA adapter
        merged into the base).

        Raises:
            StoreError: its files are gone (purged after `entry` was read).
        """
        entry = entry or self.contributor(contributor_id)
        folder = self.root / entry["path"]
        if not folder.is_dir():
            raise StoreError(f"shard {contributor_id!r} was purged; it can no longer be loaded")
        if entry["kind"] == "full":
            return self.unet_class().from_pretrained(folder, **LOAD).eval()
        return PeftModel.from_pretrained(self.load_base(), folder).merge_and_unload().eval()

    def load_bank(self, capacity: int | None = None, lora: str | None = None) -> ShardBank:
        """A lazy, bounded cache over the live shards: `capacity` shards (default: the
        environment variable CDM_SHARD_CACHE, else 1024) are resident at once. When
        every live shard is a LoRA adapter, `lora` (default: CDM_LORA_BANK, else
        "adapters") picks how they are evaluated: "adapters" unmerged on one shared
        base (adapters.py), "merged" each merged into a copy of the base.

        The bank keeps the registry entries of the moment it was made: a request that
        started before an exclusion can still load the excluded shard until the purge
        deletes its files (the service's purge waits for such requests first). Every
        load checks the files against the entry's weights hash: a shard purged, or
        replaced by other weights, since the bank was made fails with StoreError rather
        than serve anything else."""
        capacity = env_int("CDM_SHARD_CACHE") if capacity is None else capacity
        lora = lora or env_str("CDM_LORA_BANK", "adapters")
        if lora not in LORA_BANKS:
            raise ValueError(f"CDM_LORA_BANK={lora!r}; allowed: {list(LORA_BANKS)}")
        entries = {c: dict(self.contributor(c)) for c in self.contributor_ids}
        unmerged = lora == "adapters" and bool(entries) and all(
            e["kind"] == "lora" for e in entries.values())

        def load_state(cid: str) -> dict:
            entry = entries[cid]
            folder = self.root / entry["path"]
            # checked against the entry's hash (through this host's copy, if it keeps one)
            files = (read_verified(folder, entry["weights_hash"]) if self.local_cache is None
                     else self.local_cache.read(cid, folder, entry["weights_hash"]))
            if not files:
                raise StoreError(f"shard {cid!r} was purged or replaced since this sampler "
                                 "was loaded; it is not used (send the request again)")
            if unmerged:
                return read_adapter(folder, files)
            if entry["kind"] == "full":
                return safetensors_load(files["diffusion_pytorch_model.safetensors"])
            return self.load_shard(cid, entry).state_dict()  # an adapter merged into the base

        if not unmerged:
            return ShardBank(self.unet_template(), load_state, list(entries), capacity)
        first = read_adapter(self.root / next(iter(entries.values()))["path"])
        return ShardBank(self.load_base(), load_state, list(entries), capacity,
                         adapters={"targets": sorted(first["layers"]), "rank": first["rank"]})

    def load_sampler(self, device: str | None = None, cache_shards: int | None = None,
                     router: str | None = None) -> ComposedSampler:
        """The live shards (loaded lazily) and the router, ready to sample on `device`.

        Raises:
            StoreError: no live contributor, or `router` is not the one the store has.
        """
        if router is not None and router != self.config.router:
            raise StoreError(f"router={router!r}, but store {self.root} was built with router "
                             f"{self.config.router!r}; allowed: {self.config.router!r} "
                             "(rebuild with cdm train --router for the other)")
        if not self.contributor_ids:
            raise StoreError(f"store {self.root} has no contributors")
        counts = {c: self.label_counts(c) for c in self.contributor_ids} if self.num_labels else None
        codec = self.latent_codec()
        return compose(self.load_bank(cache_shards), dict(self.noise_schedule().config),
                       self.image_shape, self.load_router(), self.priors(), counts,
                       self.num_labels, self.text_encoder(),
                       None if codec is None else codec.decode).to(pick_device(device))
