"""The shard store on disk, and the registry of which contributors are live.

    STORE/
      manifest.json                  the registry; written atomically, source of truth
      schedule/scheduler_config.json the shared forward process (diffusers)
      base/                          public base UNet (LoRA stores only)
      shards/<id>/                   config + safetensors + shard.json
      router/<id>/                   the contributor's density-ratio head (router `heads`)
      reference/images.safetensors   public reference data of the heads (owned by nobody),
                                     with its labels in a labelled store
      classifier/v<NNNN>/            joint classifier (router `joint`); the manifest names one
      data/<id>/images.safetensors   the contributor's data (and labels), only with keep_data

A labelled store (its contributors' folders hold labels; `num_labels` in the manifest,
fixed when the store is created) has class-conditional shards and router, and every
contributor's entry lists its label counts; a contributor added later must be
labelled, with labels below `num_labels`.

Router `heads` (the default): everything derived from contributor c is
shards/c and router/c, trained on D_c alone; forgetting deletes them and retrains
nothing, adding trains them and touches nothing else, and D_c is not kept unless
asked for. Router `joint`: one classifier saw everyone's data, so a forget retrains
it from scratch on the kept data of the others and an add fine-tunes it on replay.

A directory not named by the manifest is not part of the store. New stores are built
in a sibling temp folder and renamed into place; additions write new folders first
and switch the manifest last, so a crash leaves the previous store intact.

Several processes (service workers, replicas on a shared disk, the CLI) may open one
store. Every manifest change runs under an exclusive `fcntl` lock on STORE/.lock,
re-reads the manifest from disk first and writes it back with `generation` + 1;
readers call `refresh()` (one `stat`) to pick up another process's change. So no
writer works from a stale copy, and an exclusion written by one process is seen by
every other at its next `refresh()`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from filelock import FileLock
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .bank import DEFAULT_CAPACITY, ShardBank
from .classifier import ShardClassifier, expand_classifier, train_classifier
from .data import (
    ContributorData,
    check_same_labelling,
    check_same_shape,
    validate_contributor_id,
)
from .errors import DataError, StoreError, UnknownContributorError, crashpoint
from .heads import DensityRatioHead, HeadsRouter, feature_dim, train_head
from .models import make_noise_schedule, make_unet, pick_device, seeded
from .sampler import ComposedSampler
from .shard import StoreConfig, derived_seed, files_hash, save_shard, train_base, train_shard
from .training import TrainConfig

FORMAT = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
ADMIN_LOCK = ".admin.lock"
CACHE_ENV = "CDM_SHARD_CACHE"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temp file beside `path`, fsync it, rename over `path`, fsync
    the directory: readers see the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ShardStore:
    """A folder of shards, their data and the shard classifier.

    Use `ShardStore.create` for a new store and `ShardStore.open` for an existing one.
    """

    def __init__(self, root: Path, manifest: dict, stamp: tuple | None = None):
        self.root = Path(root)
        self._set_manifest(manifest, stamp)
        self._lock = threading.RLock()
        # one lock file each; thread-local: two threads of one process exclude each other
        self._write_lock = FileLock(self.root / LOCK, preserve_lock_file=True)
        self._admin_lock = FileLock(self.root / ADMIN_LOCK, preserve_lock_file=True)

    def _set_manifest(self, manifest: dict, stamp: tuple | None) -> None:
        manifest.setdefault("excluded", {})
        manifest.setdefault("generation", 0)
        self.manifest = manifest
        self.config = StoreConfig.from_dict(manifest["config"])
        self._stamp = stamp

    # ---------------------------------------------------------------- reading
    @staticmethod
    def _read(root: Path) -> tuple[dict, tuple]:
        path = root / MANIFEST
        try:
            with open(path) as f:
                st = os.fstat(f.fileno())
                text = f.read()
        except FileNotFoundError:
            raise StoreError(f"no shard store at {root} (missing {MANIFEST})") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as err:
            raise StoreError(f"{path} is not valid JSON: {err}") from err
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
        return manifest, (st.st_ino, st.st_mtime_ns, st.st_size)

    @classmethod
    def open(cls, root: str | Path) -> ShardStore:
        """Open an existing store. Raises StoreError if there is none at `root`."""
        root = Path(root)
        manifest, stamp = cls._read(root)
        return cls(root, manifest, stamp)

    @property
    def generation(self) -> int:
        """Counts manifest writes: changes whenever any process changed the registry."""
        return int(self.manifest["generation"])

    def refresh(self, force: bool = False) -> bool:
        """Re-read the manifest if another process (or another ShardStore) replaced it
        since this one last read or wrote it; one `stat` when nothing changed
        (`force`: re-read anyway, as every holder of a lock does). Returns whether it
        was re-read."""
        try:
            st = os.stat(self.root / MANIFEST)
        except FileNotFoundError:
            raise StoreError(f"store {self.root} lost its {MANIFEST}") from None
        if not force and (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
            return False
        with self._lock:
            self._set_manifest(*self._read(self.root))
        return True

    @contextlib.contextmanager
    def write_lock(self):
        """Hold the store's exclusive lock (against this process's other threads and
        other processes alike), with the manifest re-read from disk on entry. Every
        change to the manifest happens inside; reentrant within one thread. Held for
        milliseconds: training runs outside it."""
        with self._write_lock:
            self.refresh(force=True)
            yield self

    @contextlib.contextmanager
    def admin_lock(self):
        """Serialises the long operations that change what is on disk (add, purge)
        across threads and processes; exclusions do not wait for it. Reentrant
        within one thread."""
        with self._admin_lock:
            self.refresh(force=True)
            yield self

    @property
    def contributor_ids(self) -> list[str]:
        return sorted(self.manifest["contributors"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    def contributor(self, contributor_id: str) -> dict:
        """The manifest entry of a live contributor."""
        try:
            return self.manifest["contributors"][contributor_id]
        except KeyError:
            raise UnknownContributorError(contributor_id) from None

    @property
    def num_labels(self) -> int:
        """How many labels the store's class-conditional models know (0: unlabelled)."""
        return int(self.manifest.get("num_labels", 0))

    def label_counts(self, contributor_id: str) -> dict[int, int]:
        """{label: images} of a live contributor; empty in an unlabelled store."""
        return {int(y): n for y, n in self.contributor(contributor_id).get("labels", {}).items()}

    def priors(self) -> dict[str, float]:
        """lambda_i: proportional to |D_i| (`size`) or equal (`uniform`)."""
        entries = self.manifest["contributors"]
        if self.config.priors == "uniform":
            return {c: 1.0 for c in entries}
        return {c: float(e["images"]) for c, e in entries.items()}

    def noise_schedule(self) -> DDPMScheduler:
        return DDPMScheduler.from_pretrained(self.root / "schedule")

    def contributor_images(self, contributor_id: str) -> torch.Tensor:
        """The kept copy of a live contributor's data.

        Raises:
            StoreError: the store does not keep contributor data (keep_data off).
        """
        return self.contributor_data(contributor_id)[0]

    def contributor_data(self, contributor_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept copy of a live contributor's images and labels (None: unlabelled).

        Raises:
            StoreError: the store does not keep contributor data (keep_data off).
        """
        entry = self.contributor(contributor_id)
        if not entry.get("data_path"):
            raise StoreError(f"store {self.root} keeps no contributor data (keep_data is off); "
                             "rebuild it with keep_data (cdm train --keep-data) for methods "
                             "that retrain on raw data")
        kept = load_file(self.root / entry["data_path"] / "images.safetensors")
        return kept["images"], kept.get("labels")

    def reference_data(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The public reference of the heads router: images and labels."""
        kept = load_file(self.root / self.manifest["reference"]["path"] / "images.safetensors")
        return kept["images"], kept.get("labels")

    def load_classifier(self) -> ShardClassifier:
        if self.manifest.get("classifier") is None:
            raise StoreError(f"store {self.root} has no joint classifier (router "
                             f"{self.config.router!r})")
        return ShardClassifier.from_pretrained(self.root / self.manifest["classifier"]["path"]).eval()

    def load_router(self) -> ShardClassifier | HeadsRouter:
        """The joint classifier, or every live contributor's head stacked."""
        if self.config.router == "joint":
            return self.load_classifier()
        return HeadsRouter([DensityRatioHead.from_pretrained(self.root / self.contributor(c)["head"]["path"]).eval()
                            for c in self.contributor_ids])

    def router_fingerprint(self, coalition) -> dict:
        """What the router restricted to S is made of (weights hashes), and whose data
        shaped it: the joint classifier depends on everyone it saw, heads on S only."""
        if self.config.router == "joint":
            c = self.manifest["classifier"]
            return {"hashes": {"classifier": c["weights_hash"]},
                    "depends_on": sorted(set(c.get("contributor_ids") or self.contributor_ids)
                                         | set(coalition))}
        return {"hashes": {"heads": {c: self.contributor(c)["head"]["weights_hash"]
                                     for c in sorted(coalition)}},
                "depends_on": sorted(coalition)}

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
            return UNet2DModel.from_pretrained(folder).eval()
        base = UNet2DModel.from_pretrained(self.root / self.manifest["base"]["path"])
        return PeftModel.from_pretrained(base, folder).merge_and_unload().eval()

    def load_bank(self, capacity: int | None = None) -> ShardBank:
        """A lazy, bounded cache over the live shards: `capacity` shards (default: the
        environment variable CDM_SHARD_CACHE, else 1024) are resident at once.

        The bank keeps the registry entries of the moment it was made: a request that
        started before an exclusion can still load the excluded shard until the purge
        deletes its files (the service's purge waits for such requests first); a load
        after that fails with StoreError rather than use anything else."""
        if capacity is None:
            raw = os.environ.get(CACHE_ENV)
            try:
                capacity = int(raw) if raw else DEFAULT_CAPACITY
            except ValueError:
                raise ValueError(f"{CACHE_ENV}={raw!r}; allowed: an integer >= 1") from None
        entries = {c: dict(self.contributor(c)) for c in self.contributor_ids}

        def load_state(cid: str) -> dict[str, torch.Tensor]:
            entry = entries[cid]
            weights = self.root / entry["path"] / "diffusion_pytorch_model.safetensors"
            if entry["kind"] == "full" and weights.is_file():
                return load_file(weights)
            return self.load_shard(cid, entry).state_dict()

        template = make_unet(self.image_shape, self.config.unet, num_labels=self.num_labels)
        return ShardBank(template, load_state, list(entries), capacity)

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
        dev = pick_device(device)
        schedule = dict(self.noise_schedule().config)
        counts = {c: self.label_counts(c) for c in self.contributor_ids} if self.num_labels else None
        return ComposedSampler(self.load_bank(cache_shards).to(dev), self.load_router().to(dev),
                               schedule, self.priors(), self.image_shape, counts, self.num_labels)

    # ---------------------------------------------------------------- writing
    @classmethod
    def create(cls, root: str | Path, datasets: list[ContributorData],
               config: StoreConfig | None = None, public: torch.Tensor | None = None,
               device: str | None = None, progress: bool = True,
               public_labels: torch.Tensor | None = None) -> ShardStore:
        """Train one shard (and, with router `heads`, one head) per contributor, and
        the joint classifier with router `joint`; write a new store. Labelled data
        makes a labelled store (class-conditional shards and router).

        Raises:
            StoreError: `root` exists and is not empty.
            DataError: no data, duplicate ids, mismatched shapes, labelled and unlabelled
                contributors mixed, no public data where LoRA shards or router `heads`
                need it (labelled too, in a labelled store).
        """
        root = Path(root)
        config = config or StoreConfig()
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreError(f"{root} already exists and is not empty; choose a new store path")
        if not datasets:
            raise DataError("no contributors to train")
        ids = [d.contributor_id for d in datasets]
        if len(set(ids)) != len(ids):
            raise DataError(f"duplicate contributor ids: {sorted({i for i in ids if ids.count(i) > 1})}")
        check_same_shape(datasets)
        check_same_labelling(datasets)
        image_shape = datasets[0].image_shape
        labelled = datasets[0].labels is not None
        num_labels = 0
        if labelled:
            num_labels = 1 + max(int(d.labels.max()) for d in datasets)
            if public_labels is not None and len(public_labels):
                num_labels = max(num_labels, 1 + int(public_labels.max()))
        needs_public = [w for w, on in (("kind 'lora' (its base model)", config.kind == "lora"),
                                        ("router 'heads' (its reference)", config.router == "heads"))
                        if on]
        if needs_public:
            if public is None or len(public) == 0:
                raise DataError(f"{' and '.join(needs_public)} need(s) public data owned by "
                                "nobody (--public DIR)")
            if tuple(public.shape[1:]) != image_shape:
                raise DataError(f"public images have shape {tuple(public.shape[1:])}, contributors {image_shape}")
            if labelled and public_labels is None:
                raise DataError("the contributors' data is labelled, so the public data must be "
                                "too (a <label>/ folder per label or a labels.csv)")
            if labelled:
                lacking = sorted({int(y) for d in datasets for y in d.labels.unique()}
                                 - {int(y) for y in public_labels.unique()})
                if lacking:
                    raise DataError(f"the public data has no image of label(s) {lacking}, which "
                                    f"contributors hold; {' and '.join(needs_public)} need(s) them")
        if not labelled:
            public_labels = None
        tmp = root.parent / f".{root.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            cls._build(tmp, sorted(datasets, key=lambda d: d.contributor_id), config,
                       public, image_shape, pick_device(device), progress, public_labels, num_labels)
            if root.exists():
                root.rmdir()
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(root)

    @classmethod
    def _build(cls, root, datasets, config, public, image_shape, device, progress,
               public_labels=None, num_labels=0) -> None:
        scheduler = make_noise_schedule(config.schedule)
        scheduler.save_pretrained(root / "schedule")
        manifest = {"format": FORMAT, "created_at": _now(), "image_shape": list(image_shape),
                    "config": config.to_dict(), "base": None, "contributors": {},
                    "classifier": None, "reference": None, "num_labels": num_labels}
        base = None
        if config.kind == "lora":
            base, loss = train_base(public, image_shape, config, scheduler, device, progress,
                                    public_labels, num_labels)
            base.save_pretrained(root / "base")
            manifest["base"] = {"path": "base", "images": len(public), "final_loss": loss,
                                "data_hash": _tensor_hash(public), "weights_hash": files_hash(root / "base")}
        if config.router == "heads":
            (root / "reference").mkdir()
            kept = {"images": public.contiguous()}
            if public_labels is not None:
                kept["labels"] = public_labels.contiguous()
            save_file(kept, str(root / "reference" / "images.safetensors"))
            manifest["reference"] = {"path": "reference", "images": len(public),
                                     "data_hash": _tensor_hash(public)}
        store = cls(root, manifest)
        for data in tqdm(datasets, desc="shards", disable=not progress):
            manifest["contributors"][data.contributor_id] = store._write_shard(
                data, config.kind, scheduler, base, device, progress)
        if config.router == "joint":
            store._write_classifier(store._train_classifier_from_scratch(device, progress), manifest)
        else:
            store._commit(manifest)

    def add(self, data: ContributorData, kind: str | None = None, public: torch.Tensor | None = None,
            device: str | None = None, progress: bool = True) -> dict:
        """Train a shard for a new contributor, then its router part: with router
        `heads` its own head only (nothing else changes); with `joint` the classifier
        is updated (old weights kept, a head row added, fine-tuned on replayed data
        of all shards). Returns the new manifest entry.

        One add or purge at a time (`admin_lock`, across processes); new folders are
        staged and renamed, the manifest switched last under `write_lock`.

        Raises:
            DataError: the id is already live or excluded, or the image shape differs.
            StoreError: a purge is pending (router `joint`).
        """
        kind = kind or self.config.kind
        cid = validate_contributor_id(data.contributor_id)
        with self.admin_lock():
            self._check_addable(cid, kind)
            check_same_shape([data], self.image_shape)
            self._check_labels(data)
            dev = pick_device(device)
            scheduler = self.noise_schedule()
            base = None
            if kind == "lora":
                base = UNet2DModel.from_pretrained(self.root / self.manifest["base"]["path"])
            self.cleanup_orphans()
            new_entry = self._write_shard(data, kind, scheduler, base, dev, progress)
            crashpoint("add:shard-written")
            trained = None
            if self.config.router == "joint":
                trained = self._update_classifier(data, cid, dev, progress)
            with self.write_lock():
                self._check_addable(cid, kind)
                m = copy.deepcopy(self.manifest)
                m["contributors"][cid] = new_entry
                if self.config.router == "joint":
                    self._write_classifier(trained, m)
                else:
                    self._commit(m)
            return new_entry

    def _check_labels(self, data: ContributorData) -> None:
        """A labelled store takes labelled data with labels it knows (and, router
        `heads`, that its reference holds); an unlabelled one takes unlabelled data."""
        check_same_labelling([data], labelled=self.num_labels > 0)
        if not self.num_labels:
            return
        unknown = sorted(y for y in data.label_counts() if y >= self.num_labels)
        if unknown:
            raise DataError(f"contributor {data.contributor_id!r} has label(s) {unknown} (folder "
                            f"{unknown[0]}/ or its labels.csv rows), which this store does not know; "
                            f"allowed: 0..{self.num_labels - 1} (fixed when the store was created)")
        if self.config.router == "heads":
            ref_labels = self.reference_data()[1]
            lacking = sorted(set(data.label_counts()) - {int(y) for y in ref_labels.unique()})
            if lacking:
                raise DataError(f"contributor {data.contributor_id!r} has label(s) {lacking}, of "
                                "which the store's public reference holds no image")

    def _check_addable(self, cid: str, kind: str) -> None:
        if cid in self.manifest["contributors"]:
            raise DataError(f"contributor {cid!r} is already in the store")
        if cid in self.manifest["excluded"]:
            raise DataError(f"contributor {cid!r} is being forgotten; add it after the purge")
        if self.config.router == "joint" and self.pending_purges:
            raise StoreError(f"purge pending for {self.pending_purges}; add after it finishes")
        if kind == "lora" and self.manifest["base"] is None:
            raise DataError("this store has no public base model; add with --kind full")

    def _update_classifier(self, data, cid, dev, progress):
        """Router `joint`: the classifier with a new output for `cid`, fine-tuned on
        replayed data of every live contributor and `cid`'s."""
        if self.manifest["classifier"] is None:  # every earlier contributor was forgotten
            ids = [cid]
            seed = derived_seed(self.config.seed, "classifier")
            with seeded(seed):
                classifier = ShardClassifier(contributor_ids=ids, in_channels=self.image_shape[0],
                                             block_out_channels=list(self.config.classifier_channels),
                                             num_labels=self.num_labels)
            loss = train_classifier(classifier, [data.images], self.noise_schedule(),
                                    self.config.classifier_train, seed, device=dev, progress=progress,
                                    labels=None if data.labels is None else [data.labels])
            return classifier.cpu(), {"trained": "scratch", "steps": self.config.classifier_train.steps,
                                      "final_loss": loss}
        old = self.load_classifier()
        ids = sorted([*self.manifest["contributors"], cid])
        version = self.manifest["classifier"]["version"] + 1
        with seeded(derived_seed(self.config.seed, "classifier-update", str(version))):
            classifier = expand_classifier(old, ids)
        kept = {c: self.contributor_data(c) for c in self.manifest["contributors"]}
        kept[cid] = (data.images, data.labels)
        train = TrainConfig(**{**self.config.classifier_train.to_dict(),
                               "steps": self.config.classifier_update_steps, "warmup_steps": 0})
        loss = train_classifier(classifier, [kept[c][0] for c in ids], self.noise_schedule(), train,
                                derived_seed(self.config.seed, "classifier-update", str(version)),
                                labels=[kept[c][1] for c in ids] if self.num_labels else None,
                                device=dev, progress=progress)
        return classifier.cpu(), {"trained": "update", "steps": train.steps, "final_loss": loss}

    # ------------------------------------------------------------- forgetting
    def exclude(self, contributor_id: str) -> dict:
        """Stage 1 of forgetting: drop `contributor_id` from the live registry (one
        atomic manifest write under the store lock, seen by every process at its next
        `refresh`). Its files stay until `purge`. Returns its entry.

        Raises:
            UnknownContributorError: it is not live.
        """
        with self.write_lock():
            entry = self.contributor(contributor_id)
            m = copy.deepcopy(self.manifest)
            del m["contributors"][contributor_id]
            m["excluded"][contributor_id] = {**entry, "excluded_at": _now(),
                                             "generation": self.generation + 1}
            self._commit(m)
        return entry

    @property
    def pending_purges(self) -> list[str]:
        return sorted(self.manifest["excluded"])

    def purge(self, contributor_id: str, device: str | None = None, progress: bool = False) -> dict:
        """Stage 2: delete everything derived from the excluded contributor (shard,
        head, kept data, any staging folder of them) and drop the exclusion record.
        Router `heads` retrains nothing; router `joint` retrains the classifier from
        scratch on the live shards' kept data (it saw the deleted data). Idempotent
        after a crash at any point. Returns an audit record with the hashes of what
        was deleted (`purge_plan` gives the same record before anything is deleted).

        Raises:
            StoreError: `contributor_id` was not excluded first.
        """
        with self.admin_lock():
            audit = self.purge_plan(contributor_id)
            entry = self.manifest["excluded"][contributor_id]
            for rel in self._derived_paths(contributor_id, entry):
                if (self.root / rel).exists():
                    shutil.rmtree(self.root / rel)
            crashpoint("purge:files-deleted")
            joint = self.config.router == "joint"
            trained = self._train_classifier_from_scratch(pick_device(device), progress) if joint else None
            with self.write_lock():
                m = copy.deepcopy(self.manifest)
                del m["excluded"][contributor_id]
                if joint:
                    self._write_classifier(trained, m)
                else:
                    self._commit(m)
            if joint:
                audit["classifier_after"] = (self.manifest["classifier"] or {}).get("weights_hash")
            return audit

    def purge_plan(self, contributor_id: str) -> dict:
        """The audit record `purge` will return, from the exclusion record.

        Raises:
            StoreError: `contributor_id` is not excluded (never was, or already purged).
        """
        self.refresh()
        entry = self.manifest["excluded"].get(contributor_id)
        if entry is None:
            raise StoreError(f"contributor {contributor_id!r} is not excluded; forget it first")
        audit = {"contributor_id": contributor_id, "data_hash": entry["data_hash"],
                 "weights_hash": entry["weights_hash"],
                 "deleted": self._derived_paths(contributor_id, entry, staging=False),
                 "retrained": "classifier" if self.config.router == "joint" else "nothing"}
        if entry.get("head"):
            audit["head_weights_hash"] = entry["head"]["weights_hash"]
        if self.config.router == "joint":
            audit["classifier_before"] = (self.manifest["classifier"] or {}).get("weights_hash")
        return audit

    @staticmethod
    def _derived_paths(cid: str, entry: dict, staging: bool = True) -> list[str]:
        """Store-relative folders derived from contributor `cid` (and, with
        `staging`, the partial folders an interrupted add of `cid` may have left)."""
        paths = [entry["path"], (entry.get("head") or {}).get("path"), entry.get("data_path")]
        if staging:
            paths += [f"shards/.{cid}.partial", f"router/.{cid}.partial", f"data/.{cid}.partial"]
        return [p for p in paths if p]

    def cleanup_orphans(self) -> list[str]:
        """Delete staging folders and folders of contributors the manifest does not
        name (left by an add that crashed before its manifest switch). Returns the
        store-relative paths deleted. Takes the admin lock: no add is mid-way."""
        deleted = []
        with self.admin_lock():
            known = set(self.manifest["contributors"]) | set(self.manifest["excluded"])
            for folder in ("shards", "router", "data"):
                if not (self.root / folder).is_dir():
                    continue
                for child in sorted((self.root / folder).iterdir()):
                    if child.name.endswith(".partial") or child.name not in known:
                        shutil.rmtree(child, ignore_errors=True)
                        deleted.append(f"{folder}/{child.name}")
            # a classifier version the manifest does not name (a crash between a new
            # version's switch and the old one's deletion): it may have seen forgotten data
            named = (self.manifest.get("classifier") or {}).get("path")
            if (self.root / "classifier").is_dir():
                for child in sorted((self.root / "classifier").iterdir()):
                    if f"classifier/{child.name}" != named:
                        shutil.rmtree(child, ignore_errors=True)
                        deleted.append(f"classifier/{child.name}")
        return deleted

    def _train_classifier_from_scratch(self, device, progress) -> tuple[ShardClassifier, dict] | None:
        """Deterministic in (sorted live ids, their data, store seed): a store that
        retrains it after removing c equals a store that never had c. None when no
        contributor is live."""
        ids = self.contributor_ids
        if not ids:
            return None
        seed = derived_seed(self.config.seed, "classifier")
        with seeded(seed):
            classifier = ShardClassifier(contributor_ids=ids, in_channels=self.image_shape[0],
                                         block_out_channels=list(self.config.classifier_channels),
                                         num_labels=self.num_labels)
        kept = [self.contributor_data(c) for c in ids]
        loss = train_classifier(classifier, [k[0] for k in kept], self.noise_schedule(),
                                self.config.classifier_train, seed,
                                labels=[k[1] for k in kept] if self.num_labels else None,
                                device=device, progress=progress)
        return classifier.cpu(), {"trained": "scratch", "steps": self.config.classifier_train.steps,
                                  "final_loss": loss}

    def _write_shard(self, data, kind, scheduler, base, device, progress) -> dict:
        """Train and write shards/<id> (and router/<id>, data/<id> where configured);
        each folder is staged and renamed. The manifest is the caller's to switch:
        until it names <id>, these folders are orphans `cleanup_orphans` deletes."""
        cid = data.contributor_id
        model, meta = train_shard(data, kind, self.config, scheduler, base, device, progress,
                                  self.num_labels)
        staging = self.root / "shards" / f".{cid}.partial"
        weights_hash = save_shard(model, meta, staging)
        entry = {**meta, "path": f"shards/{cid}", "data_path": None,
                 "weights_hash": weights_hash, "added_at": _now()}
        if self.config.router == "heads":
            entry["head"] = self._write_head(data, scheduler, device, progress)
        shard_dir, data_dir = self.root / "shards" / cid, self.root / "data" / cid
        for orphan in (shard_dir, data_dir):  # left by a crash before a manifest switch
            shutil.rmtree(orphan, ignore_errors=True)
        if self.config.keeps_data:
            data_staging = self.root / "data" / f".{cid}.partial"
            data_staging.mkdir(parents=True)
            kept = {"images": data.images.contiguous()}
            if data.labels is not None:
                kept["labels"] = data.labels.contiguous()
            save_file(kept, str(data_staging / "images.safetensors"),
                      metadata={"data_hash": data.data_hash})
            os.replace(data_staging, data_dir)
            entry["data_path"] = f"data/{cid}"
        os.replace(staging, shard_dir)
        return entry

    def _write_head(self, data, scheduler, device, progress) -> dict:
        """Train router/<id> on D_id against the reference (heads.py eq. 5)."""
        cid = data.contributor_id
        seed = derived_seed(self.config.seed, "head", cid)
        with seeded(seed):
            head = DensityRatioHead(contributor_id=cid, in_features=feature_dim(self.image_shape),
                                    hidden=self.config.head_hidden, num_labels=self.num_labels)
        reference, reference_labels = self.reference_data()
        loss = train_head(head, data.images, reference, scheduler, self.config.head_train, seed,
                          labels=data.labels, reference_labels=reference_labels,
                          device=device, progress=progress)
        staging, final = self.root / "router" / f".{cid}.partial", self.root / "router" / cid
        head.cpu().save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return {"path": f"router/{cid}", "weights_hash": files_hash(final), "seed": seed,
                "steps": self.config.head_train.steps, "final_loss": loss}

    def _write_classifier(self, trained: tuple[ShardClassifier, dict] | None, manifest: dict) -> None:
        """Save as a new version, then commit `manifest` naming it, then drop the old.
        `None` (no live contributor) leaves the store without a classifier."""
        previous = manifest.get("classifier")
        if trained is None:
            manifest["classifier"] = None
        else:
            classifier, meta = trained
            version = (previous or {}).get("version", 0) + 1
            path = f"classifier/v{version:04d}"
            classifier.save_pretrained(self.root / path)
            manifest["classifier"] = {**meta, "version": version, "path": path,
                                      "contributor_ids": list(classifier.config.contributor_ids),
                                      "weights_hash": files_hash(self.root / path)}
        self._commit(manifest)
        crashpoint("classifier:switched")
        if previous and previous["path"] != (manifest["classifier"] or {}).get("path"):
            shutil.rmtree(self.root / previous["path"], ignore_errors=True)

    def _commit(self, manifest: dict) -> None:
        """Write `manifest` as the next generation and make it this object's view.
        Callers hold `write_lock` (or own a store no one else can see yet)."""
        manifest["generation"] = int(manifest.get("generation", 0)) + 1
        write_json_atomic(self.root / MANIFEST, manifest)
        st = os.stat(self.root / MANIFEST)
        with self._lock:
            self._set_manifest(manifest, (st.st_ino, st.st_mtime_ns, st.st_size))


def _tensor_hash(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()
