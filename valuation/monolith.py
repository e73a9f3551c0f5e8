"""Utilities that need training per coalition: the ground truth and Lin et al.'s
estimate, both on one monolithic UNet of the store's shard architecture.

retrain (truth, small n): for each S, a UNet initialised from the same seed and
    trained from scratch on D_S = union of the stored data of S; sampled and measured.

pruned fine-tune (Lin et al., "Efficient Shapley values for attributing global
properties of diffusion models to data groups"):
    1. train a monolithic UNet on D_N (all contributors);
    2. prune it structurally with torch-pruning (magnitude importance, L2), ratio r;
    3. fine-tune the pruned model on D_N;
    4. for each S: fine-tune a copy k steps on D_S, sample, measure.
    Steps 1-3 run once and are stored under STORE/valuation/pruned/<key>/ (the
    unpruned monolith in diffusers layout and the pruned weights as safetensors; the
    pruned structure is rebuilt by pruning the monolith again, which is deterministic).
    A base is built in a staging folder and renamed into place with its pruned.json,
    which names the contributors whose data shaped it, so that a forget always finds
    it (`drop_pruned_bases`, run at every purge as `CLEANER`, deletes staging folders
    whoever they were built for).

Both sample with the one-model sampler below, with the same seed for every S
(common random numbers), and share U(empty set) with composition (`prior_images`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file, save_file

from shards import ShardStore
from shards.errors import DataError
from shards.files import fsync_dir, write_json_atomic
from shards.forgetting import Cleaner, register_cleaner
from shards.models import LOAD, make_unet
from shards.sampler import ComposedSampler, compose
from shards.shard import derived_seed
from shards.training import TrainConfig, train_denoiser

from .properties import load_property
from .utility import digest, prior_images

STAGING_PREFIX = ".staging-"  # STORE/valuation/pruned/.staging-<key>-<random>/: being built


def single_model_sampler(model: torch.nn.Module, schedule_config: dict, shape) -> ComposedSampler:
    """One UNet as a one-shard composition: its weight is exactly 1, so this is plain
    sampling with that UNet (tests/test_sampler.py holds it against the chain), with
    the same initial and step noise as the composed sampler for the same seed."""
    return compose({"all": model}, schedule_config, shape)


def prune_unet(model: UNet2DModel, ratio: float) -> dict:
    """Prune `model` in place (channels of every conv/linear except the output conv).

    torch-pruning keeps GroupNorm groups whole and attention heads consistent; after
    it, diffusers' Downsample2D/Upsample2D still hold the old `channels` (their forward
    asserts on it), so it is refreshed from the pruned conv: an attribute of diffusers'
    internals, tested with the diffusers versions pyproject.toml admits (an upper
    bound). Returns parameter counts.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"pruning ratio={ratio} must be in (0, 1)")
    before = sum(p.numel() for p in model.parameters())
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    example = {"sample": torch.randn(2, model.config.in_channels, h, w),
               "timestep": torch.tensor([1, 500])}
    heads = {lin: m.heads for m in model.modules() if isinstance(m, Attention)
             for lin in (m.to_q, m.to_k, m.to_v)}
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[model.conv_out], num_heads=heads,
        output_transform=lambda out: out.sample)
    pruner.step()
    for module in model.modules():
        if isinstance(module, Downsample2D | Upsample2D) and module.conv is not None:
            module.channels = module.conv.in_channels
    after = sum(p.numel() for p in model.parameters())
    return {"params_before": before, "params_after": after, "kept": after / before}


class _MonolithUtility:
    """Shared parts: store data, property, sampling settings and the one-model sampler."""

    method = "monolith"

    def __init__(self, store_root, property: str, n: int = 256, steps: int = 25, seed: int = 0,
                 scheduler: str = "ddpm", device: str | None = "cpu", aesthetic: dict | None = None):
        self.store = ShardStore.open(store_root)
        if self.store.pipeline:
            raise DataError(f"store {store_root} composes LoRA shards of a pretrained "
                            f"pipeline; the {self.method} baseline trains a pixel-space UNet "
                            "from scratch, so value it by composition (--methods exact)")
        self.players = tuple(self.store.contributor_ids)
        self.property = property
        self.measure = load_property(self.store.root, property, aesthetic)
        self.settings = {"n": n, "steps": steps, "seed": seed, "scheduler": scheduler}
        self.device = device or "cpu"
        self.schedule = self.store.noise_schedule()

    def data(self, coalition) -> torch.Tensor:
        return torch.cat([self.store.contributor_images(c) for c in sorted(coalition)])

    def data_hashes(self, coalition) -> dict:
        return {c: self.store.contributor(c)["data_hash"] for c in sorted(coalition)}

    def measure_model(self, model, coalition) -> float:
        s = self.settings
        if not coalition:
            return self.measure(prior_images(s["n"], self.store.image_shape, s["seed"]))
        sampler = single_model_sampler(model.to(self.device), dict(self.schedule.config),
                                       self.store.image_shape)
        return self.measure(sampler(["all"], n=s["n"], steps=s["steps"], seed=s["seed"],
                                    scheduler=s["scheduler"]).images)

    def train(self, model, images, config: TrainConfig, name: str, progress: bool = False) -> float:
        seed = derived_seed(self.settings["seed"], self.method, name)
        return train_denoiser(model, images, self.schedule, config, seed, device=self.device,
                              desc=name, progress=progress)


class RetrainUtility(_MonolithUtility):
    """U(S) of a UNet trained from scratch on D_S (same init seed for every S)."""

    method = "retrain"

    def __init__(self, store_root, property: str, train: dict | None = None, **kwargs):
        super().__init__(store_root, property, **kwargs)
        self.train_config = TrainConfig(**(train or {}))

    def key(self, coalition):
        return digest({"method": self.method, "property": self.measure.key,
                       "settings": self.settings, "train": self.train_config.to_dict(),
                       "unet": self.store.config.unet, "data": self.data_hashes(coalition)})

    def depends_on(self, coalition):
        return sorted(coalition)

    def evaluate(self, coalition):
        if not coalition:
            return self.measure_model(None, coalition)
        model = make_unet(self.store.image_shape, self.store.config.unet,
                          seed=derived_seed(self.settings["seed"], "retrain", "init"))
        self.train(model, self.data(coalition), self.train_config, "retrain")
        return self.measure_model(model, coalition)


class PrunedFinetuneUtility(_MonolithUtility):
    """U(S) of the pruned, fine-tuned monolith after k more steps on D_S."""

    method = "pruned"

    def __init__(self, store_root, property: str, ratio: float = 0.3,
                 monolith: dict | None = None, finetune: dict | None = None,
                 subset: dict | None = None, progress: bool = False, **kwargs):
        super().__init__(store_root, property, **kwargs)
        self.ratio = ratio
        self.configs = {"monolith": TrainConfig(**(monolith or {"steps": 2400})),
                        "finetune": TrainConfig(**(finetune or {"steps": 800})),
                        "subset": TrainConfig(**(subset or {"steps": 100, "warmup_steps": 0}))}
        self.base_key = digest({"ratio": ratio, "seed": self.settings["seed"],
                                "unet": self.store.config.unet,
                                "monolith": self.configs["monolith"].to_dict(),
                                "finetune": self.configs["finetune"].to_dict(),
                                "data": self.data_hashes(self.players)})
        self.folder = self.store.root / "valuation" / "pruned" / self.base_key[:16]
        self.progress = progress
        self._base = None

    def key(self, coalition):
        return digest({"method": self.method, "property": self.measure.key, "base": self.base_key,
                       "settings": self.settings, "subset": self.configs["subset"].to_dict(),
                       "coalition": sorted(coalition)})

    def depends_on(self, coalition):
        return list(self.players)  # steps 1-3 saw everyone's data

    def prepare(self) -> dict:
        """Steps 1-3, stored; returns their metadata (timings, parameter counts).

        Built in a staging folder beside the final one; its pruned.json (with
        `depends_on`, every player) is written last, then the folder is renamed into
        place. So on disk a base is complete and names its contributors, or is a staging
        folder, which `drop_pruned_bases` deletes whatever it is for; an interrupted
        build leaves nothing else. A base whose staging folder a forget deleted, or one
        of whose players is no longer live when it is done, is discarded, not published.

        Raises:
            RuntimeError: the base was discarded for one of those two reasons (a forget
                ran while it was built); running the valuation again rebuilds it from the
                live contributors.
        """
        meta = _read_meta(self.folder)
        if meta is not None:
            return meta
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        staging = self.folder.parent / f"{STAGING_PREFIX}{self.folder.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        # held open so that its inode cannot be reused: tells our folder from a new one
        # that a writer below (save_pretrained makes parents) created after a forget
        # deleted ours
        handle = os.open(staging, os.O_RDONLY)
        try:
            try:
                meta = self._build_base(staging)
            except Exception as err:  # OSError, or safetensors' own for a missing folder
                if not _same_folder(staging, handle):
                    raise RuntimeError(f"pruned base {self.folder.name} discarded, run the "
                                       "valuation again: its staging folder was deleted while "
                                       "it was built (a forget dropped the pruned bases)") from err
                raise
            return self._publish(staging, handle, meta)
        finally:
            os.close(handle)
            shutil.rmtree(staging, ignore_errors=True)  # gone already once published

    def _build_base(self, staging: Path) -> dict:
        """Steps 1-3 into `staging`: monolith/, pruned.safetensors, then pruned.json,
        whose content it returns."""
        data = self.data(self.players)
        start = time.perf_counter()
        model = make_unet(self.store.image_shape, self.store.config.unet,
                          seed=derived_seed(self.settings["seed"], "pruned", "init"))
        loss = self.train(model, data, self.configs["monolith"], "monolith", self.progress)  # 1.
        model.save_pretrained(staging / "monolith")
        trained = time.perf_counter() - start
        info = prune_unet(model, self.ratio)  # 2.
        ft_loss = self.train(model, data, self.configs["finetune"], "finetune", self.progress)  # 3.
        save_file(model.state_dict(), str(staging / "pruned.safetensors"))
        meta = {**info, "ratio": self.ratio, "monolith_loss": loss, "finetune_loss": ft_loss,
                "monolith_seconds": trained, "seconds": time.perf_counter() - start,
                "depends_on": list(self.players)}
        write_json_atomic(staging / "pruned.json", meta)
        return meta

    def _publish(self, staging: Path, handle: int, meta: dict) -> dict:
        """Rename the built `staging` folder (open as `handle`, holding `meta`) to
        `self.folder`; returns the metadata of the base now there (another writer's, if
        it won the race).

        Raises:
            RuntimeError: `staging` was deleted or replaced while it was built, or a
                player is no longer live.
        """
        discarded = f"pruned base {self.folder.name} discarded, run the valuation again"
        if not _same_folder(staging, handle):
            raise RuntimeError(f"{discarded}: its staging folder was deleted while it was "
                               "built (a forget dropped the pruned bases)")
        # under the write lock: an exclusion is seen here, or its purge's cleaner comes
        # after the rename and deletes the base (valuation/cache.py publish_if_live)
        with self.store.write_lock():
            gone = sorted(set(self.players) - set(self.store.contributor_ids))
            if gone:
                raise RuntimeError(f"{discarded}: contributors {gone} whose data it was "
                                   "trained on were forgotten while it was built")
            try:
                os.rename(staging, self.folder)
            except FileNotFoundError as err:
                raise RuntimeError(f"{discarded}: its staging folder was deleted before it "
                                   "was renamed into place (a forget dropped the pruned "
                                   "bases)") from err
            except OSError:  # the final folder exists: another writer's, or a partial one
                theirs = _read_meta(self.folder)
                if theirs is not None:
                    return theirs
                shutil.rmtree(self.folder)  # untrusted: no readable pruned.json
                os.rename(staging, self.folder)
            fsync_dir(self.folder.parent)
        return meta

    def base(self) -> UNet2DModel:
        if self._base is None:
            self.prepare()
            model = UNet2DModel.from_pretrained(self.folder / "monolith", **LOAD)
            prune_unet(model, self.ratio)
            model.load_state_dict(load_file(str(self.folder / "pruned.safetensors")))
            self._base = model.eval()
        return self._base

    def evaluate(self, coalition):
        if not coalition:
            return self.measure_model(None, coalition)
        model = copy.deepcopy(self.base())
        self.train(model, self.data(coalition), self.configs["subset"], "subset")  # 4.
        return self.measure_model(model, coalition)


def _read_meta(folder: Path) -> dict | None:
    """`folder`'s pruned.json if it is readable JSON with a `depends_on` list, else None
    (missing, half written, or not what `prepare` writes)."""
    try:
        meta = json.loads((folder / "pruned.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("depends_on"), list):
        return None
    return meta


def _same_folder(path: Path, handle: int) -> bool:
    """Whether `path` is still the folder open as `handle` (not deleted, not replaced)."""
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except FileNotFoundError:
        return False


def drop_pruned_bases(store_root: str | Path, contributor_id: str) -> int:
    """Delete stored pruned bases whose training data included `contributor_id`, and
    everything under STORE/valuation/pruned/ that cannot say whose data it holds:
    staging folders (a base being built, or left by an interrupted build, whoever it is
    for), folders without a readable pruned.json, and stray files. Returns how many
    entries were deleted.

    A build in progress whose staging folder this deletes fails (see `prepare`) rather
    than publish a base.
    """
    root = Path(store_root, "valuation", "pruned")
    if not root.is_dir():
        return 0
    dropped = 0
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.is_symlink():
            meta = None if path.name.startswith(STAGING_PREFIX) else _read_meta(path)
            if meta is not None and contributor_id not in meta["depends_on"]:
                continue
            try:
                shutil.rmtree(path)
            except FileNotFoundError:  # a concurrent drop, or its build failed meanwhile
                continue
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
        dropped += 1
    return dropped


CLEANER = Cleaner("pruned-bases", "valuation", drop_pruned_bases)
register_cleaner(CLEANER)  # also where the package is not installed (no entry points)
