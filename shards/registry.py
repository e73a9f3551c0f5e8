"""The registry of a store: which contributors are live, read from and written to
STORE/manifest.json, under locks that every process opening the store shares.

The manifest is the source of truth: a folder it does not name is not part of the
store. It is written atomically (temp file, fsync, rename), always as the next
`generation`, and only under the store's exclusive write lock (an `fcntl` lock on
STORE/.lock, or a PostgreSQL advisory lock for many hosts: coordination.py), after
re-reading it from disk; readers call `refresh()` (one `stat`) to pick up another
process's change. So no writer works from a stale copy, and an exclusion written by
one process is seen by every other at its next `refresh()`.

Long operations hold one of two more locks, so that forgetting never waits for a
contributor's training: purges hold the admin lock (one at a time), adds and
valuations the work lock (one at a time). A purge and an add touch different
contributors' folders; what both could touch (the manifest, the joint classifier's
versions, the orphan sweep) happens under the write lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from . import settings
from .classifier import JointRouter
from .config import StoreConfig
from .coordination import store_locks
from .errors import StoreError, StoreUnavailableError, UnknownContributorError
from .files import write_json_atomic
from .heads import HeadsRouter
from .localcache import LocalCache
from .models import LOAD, make_unet
from .pipeline import LatentCodec, PipelineTextEncoder
from .router import Router, RouterUpdate
from .text import TextEncoder, check_encoder

FORMAT = 1
MANIFEST = "manifest.json"


log = logging.getLogger(__name__)

ROUTERS: dict[str, Router] = {"heads": HeadsRouter(), "joint": JointRouter()}
if tuple(ROUTERS) != settings.ROUTERS:
    raise RuntimeError("shards/registry.py and shards/settings.py ROUTERS disagree")


def router_for(kind: str) -> Router:
    """The router of `kind` (one of shards/settings.py ROUTERS).

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in ROUTERS:
        raise ValueError(f"router={kind!r}; allowed: {sorted(ROUTERS)}")
    return ROUTERS[kind]


def now() -> str:
    """The time as the manifest records it (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(root: Path) -> tuple[dict, tuple]:
    """The manifest of the store at `root` and its file stamp (inode, mtime, size).

    Raises:
        StoreError: no manifest, not JSON, or of another format.
    """
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
    # written before forgetting had two stages, or before generations were counted
    manifest.setdefault("excluded", {})
    manifest.setdefault("generation", 0)
    return manifest, (st.st_ino, st.st_mtime_ns, st.st_size)


class ShardRegistry:
    """The live contributors of the store at `root`, their entries, and the locks."""

    def __init__(self, root: str | Path, manifest: dict, stamp: tuple | None = None):
        self.root = Path(root)
        self._lock = threading.RLock()
        # files in the folder, or PostgreSQL advisory locks for many hosts (coordination.py);
        # stores made before store_id existed are told apart by their creation time
        key = str(manifest.get("store_id") or manifest.get("created_at", ""))
        self.locks = store_locks(self.root, key)
        # this host's copies of shard weights (CDM_LOCAL_CACHE), pruned at every new manifest
        self.local_cache = LocalCache.for_store(self.root, key)
        self._set(manifest, stamp)

    def _set(self, manifest: dict, stamp: tuple | None) -> None:
        with self._lock:
            self.manifest = manifest
            self.config = StoreConfig.from_dict(manifest["config"])
            self._stamp = stamp
        if self.local_cache is not None:  # a forgotten (or replaced) shard's copies go
            live = {c: e["weights_hash"] for c, e in manifest["contributors"].items()}
            try:
                self.local_cache.prune(live)
            except OSError as err:
                log.warning("local cache %s not pruned: %s", self.local_cache.folder, err)

    @classmethod
    def open(cls, root: str | Path):
        """Open an existing store. Raises StoreError if there is none at `root`."""
        root = Path(root)
        return cls(root, *read_manifest(root))

    # ---------------------------------------------------------- generations
    @property
    def generation(self) -> int:
        """Counts manifest writes: changes whenever any process changed the registry."""
        return int(self.manifest["generation"])

    def refresh(self, force: bool = False) -> bool:
        """Re-read the manifest if another process (or another object) replaced it
        since this one last read or wrote it; one `stat` when nothing changed
        (`force`: re-read anyway, as every holder of a lock does). Returns whether it
        was re-read."""
        try:
            st = os.stat(self.root / MANIFEST)
        except OSError as err:  # the volume unmounted, unreachable, or the file deleted
            raise StoreUnavailableError(f"store {self.root}: its {MANIFEST} cannot be read now "
                                        f"({err.strerror or err})") from None
        if not force and (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
            return False
        self._set(*read_manifest(self.root))
        return True

    def commit(self, manifest: dict, update: RouterUpdate | None = None) -> None:
        """Write `manifest` as the next generation and make it this object's view;
        with a router `update`, its files are written and named in `manifest` first,
        and what it replaced is deleted after. Callers hold `write_lock` (or own a
        store no one else can see yet)."""
        self.locks.check()  # a lock lost with its connection is no longer this process's
        if update is not None:
            update.apply(manifest)
        manifest["generation"] = int(manifest.get("generation", 0)) + 1
        write_json_atomic(self.root / MANIFEST, manifest)
        st = os.stat(self.root / MANIFEST)
        self._set(manifest, (st.st_ino, st.st_mtime_ns, st.st_size))
        try:  # wakes the other hosts now; they would see it at their next refresh anyway
            self.locks.committed(manifest["generation"])
        except Exception as err:  # noqa: BLE001 - the commit stands; a late wake is harmless
            log.warning("manifest generation %s not announced: %s", manifest["generation"], err)
        if update is not None:
            update.finish()

    @contextlib.contextmanager
    def write_lock(self):
        """Hold the store's exclusive lock (against this process's other threads and
        other processes alike), with the manifest re-read from disk on entry. Every
        change to the manifest happens inside; reentrant within one thread. Held for
        milliseconds: training runs outside it."""
        with self.locks.hold("write"):
            self.refresh(force=True)
            yield self

    @contextlib.contextmanager
    def admin_lock(self):
        """Serialises purges across threads and processes; exclusions, adds and
        valuations do not wait for it. Reentrant within one thread."""
        with self.locks.hold("admin"):
            self.refresh(force=True)
            yield self

    @contextlib.contextmanager
    def work_lock(self):
        """Serialises adds and valuations (and the orphan sweep) across threads and
        processes; purges do not wait for it. Reentrant within one thread."""
        with self.locks.hold("work"):
            self.refresh(force=True)
            yield self

    # -------------------------------------------------------------- reading
    @property
    def router(self) -> Router:
        """The store's router (the kind its config names)."""
        return router_for(self.config.router)

    @property
    def contributor_ids(self) -> list[str]:
        return sorted(self.manifest["contributors"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])

    @property
    def num_labels(self) -> int:
        """How many labels the store's class-conditional models know (0: unlabelled)."""
        return int(self.manifest.get("num_labels", 0))

    @property
    def text(self) -> dict | None:
        """The text encoder a text-conditional store's models read (text.py
        `encoder_info`), None in a store without text conditioning."""
        return self.manifest.get("text")

    @property
    def text_dim(self) -> int:
        return int(self.text["dim"]) if self.text else 0

    @property
    def pipeline(self) -> dict | None:
        """A pretrained latent base (pipeline.py `check_pipeline` and its path), None in
        a store that works on pixels."""
        return self.manifest.get("pipeline")

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images contributors bring and requests get: `image_shape`
        (what the models see) but in a latent store, where that is the latents'."""
        pipe = self.pipeline
        return tuple(pipe["pixel_shape"]) if pipe else self.image_shape

    def text_encoder(self) -> TextEncoder | None:
        """The frozen text encoder of a text-conditional store (None otherwise): the
        pipeline's in a latent store, else all-MiniLM-L6-v2 (text.py).

        Raises:
            StoreError: the installed MiniLM's weights are not the ones the store's
                models were trained with.
        """
        if not self.text:
            return None
        if self.text.get("kind") == "pipeline":
            return PipelineTextEncoder.for_store(self.root / self.text["path"], self.text)
        check_encoder(self.text)
        return TextEncoder.shared()

    def latent_codec(self) -> LatentCodec | None:
        """The VAE of a latent store, None in a pixel store."""
        return LatentCodec.for_store(self.root / self.pipeline["path"]) if self.pipeline else None

    def model_space(self, data, progress: bool = False):
        """`data` (ContributorData of `pixel_shape` images) as the models see it: its
        images encoded to latents in a latent store, unchanged otherwise."""
        codec = self.latent_codec()
        if codec is None:
            return data
        return dataclasses.replace(data, images=codec.encode(data.images, progress,
                                                             data.contributor_id))

    def unet_template(self):
        """A UNet of the store's shard architecture (its weights are not used)."""
        if self.pipeline:
            cls = UNet2DConditionModel
            return cls.from_config(cls.load_config(self.root / self.manifest["base"]["path"]))
        return make_unet(self.image_shape, self.config.unet, num_labels=self.num_labels,
                         text_dim=self.text_dim)

    def unet_class(self) -> type:
        """The diffusers class of the store's UNets."""
        return UNet2DConditionModel if self.text else UNet2DModel

    @property
    def pending_purges(self) -> list[str]:
        """Contributors excluded whose purge has not finished."""
        return sorted(self.manifest["excluded"])

    def contributor(self, contributor_id: str) -> dict:
        """The manifest entry of a live contributor.

        Raises:
            UnknownContributorError: it is not live.
        """
        try:
            return self.manifest["contributors"][contributor_id]
        except KeyError:
            raise UnknownContributorError(contributor_id) from None

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
        """The forward process every model of the store shares."""
        return DDPMScheduler.from_pretrained(self.root / "schedule")

    def load_base(self) -> UNet2DModel | None:
        """The public base model (trained on public data only), None in a store without one."""
        base = self.manifest["base"]
        return None if base is None else self.unet_class().from_pretrained(self.root / base["path"], **LOAD)

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

    def contributor_images(self, contributor_id: str) -> torch.Tensor:
        """The kept copy of a live contributor's images (see `contributor_data`)."""
        return self.contributor_data(contributor_id)[0]
