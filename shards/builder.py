"""Building a store and adding to it: everything trained from what a contributor
brings (its shard, its part of the router, a kept copy of its data where configured).

A new store is built in a sibling temp folder and renamed into place; an add writes
new folders first (each staged as `.<id>.partial` and renamed) and switches the
manifest last, under the write lock, so a crash leaves the previous store intact and
folders the manifest does not name, which `forgetting.cleanup_orphans` deletes. One
add runs at a time (the work lock, across processes); purges run beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import StoreConfig
from .data import ContributorData, check_same_labelling, check_same_shape, validate_contributor_id
from .errors import DataError, StoreError
from .faults import crashpoint
from .files import building, files_hash, tensor_hash
from .forgetting import cleanup_orphans
from .models import LOAD, make_noise_schedule, pick_device
from .pipeline import LatentCodec, check_pipeline, import_pipeline, latent_shape, text_info
from .registry import FORMAT, ShardRegistry, now, router_for
from .shard import save_shard, train_base, train_shard
from .text import encoder_info


def build_store(root: str | Path, datasets: list[ContributorData], config: StoreConfig,
                public: torch.Tensor | None, public_labels: torch.Tensor | None,
                device: str | None, progress: bool, workers: int = 1,
                public_captions: list[str] | None = None, text: bool = False,
                pipeline: str | Path | None = None) -> Path:
    """Train one shard (and its router part) per contributor and the router's shared
    part; write the store at `root`. Labelled data makes a labelled store
    (class-conditional shards and router); `text` a text-conditional one, on every
    contributor's captions (its labels, if any, are not used). `workers` > 1 trains the contributors in
    that many spawned processes on the CPU, each with its share of this process's
    threads. `pipeline`: a local Stable Diffusion folder (pipeline.py), whose UNet the
    shards adapt (kind 'lora') on the VAE's latents of the images. Returns `root`.

    Raises:
        StoreError: `root` exists and is not empty.
        DataError: no data, duplicate ids, mismatched shapes, labelled and unlabelled
            contributors mixed, no public data where LoRA shards or the router need it
            (labelled too, in a labelled store; captioned, in a text store), a
            contributor without captions or the joint router in a text store; a
            `pipeline` folder that is not one, or without captions or kind 'lora'.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreError(f"{root} already exists and is not empty; choose a new store path")
    if not datasets:
        raise DataError("no contributors to train")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; allowed: an integer >= 1")
    ids = [d.contributor_id for d in datasets]
    if len(set(ids)) != len(ids):
        raise DataError(f"duplicate contributor ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    check_same_shape(datasets)
    if text:
        datasets = _text_datasets(datasets, config, public, public_captions)
        public_labels = None
    latent = None
    if pipeline is not None:
        latent, datasets, public = _latent_inputs(pipeline, datasets, config, public, text,
                                                  progress)
        config = config.replace(schedule=latent["schedule"])
    check_same_labelling(datasets)
    image_shape = datasets[0].image_shape
    labelled = datasets[0].labels is not None
    num_labels = 0
    if labelled:
        num_labels = 1 + max(int(d.labels.max()) for d in datasets)
        if public_labels is not None and len(public_labels):
            num_labels = max(num_labels, 1 + int(public_labels.max()))
    router = router_for(config.router)
    base_use = ("kind 'lora' (its base model)" if config.kind == "lora" else
                "shard_init 'base' (its base model)" if config.needs_base() else None)
    needs = [use for use in (base_use, router.public_use) if use]
    if needs:
        _check_public(datasets, public, public_labels, image_shape, labelled, needs)
    with building(root) as tmp:
        _build(tmp, sorted(datasets, key=lambda d: d.contributor_id), config, public,
               public_labels if labelled else None, image_shape, num_labels,
               pick_device(device), progress, workers, public_captions if text else None,
               latent)
    return root


def _latent_inputs(folder, datasets, config: StoreConfig, public, text: bool, progress: bool):
    """(what the store records of the pipeline, the contributors' and the public
    images as the VAE's latents)."""
    info = check_pipeline(folder)
    if not text:
        raise DataError("--base: a Stable Diffusion pipeline is text-conditional; every "
                        "contributor and the public data need captions (captions.csv or a "
                        ".txt per image)")
    if config.kind != "lora":
        raise DataError(f"--base: shards are LoRA adapters on the pipeline's UNet (kind "
                        f"'lora'), not {config.kind!r}")
    pixel_shape = datasets[0].image_shape
    latent_shape(info, pixel_shape)
    if public is not None and tuple(public.shape[1:]) != pixel_shape:
        raise DataError(f"public images have shape {tuple(public.shape[1:])}, contributors "
                        f"{pixel_shape}")
    codec = LatentCodec(Path(folder))
    datasets = [dataclasses.replace(d, images=codec.encode(d.images, progress, d.contributor_id))
                for d in datasets]
    public = None if public is None else codec.encode(public, progress, "public")
    return {**info, "pixel_shape": list(pixel_shape)}, datasets, public


def _text_datasets(datasets, config: StoreConfig, public, public_captions) -> list:
    """A text store's data: every contributor captioned, labels dropped."""
    if config.router != "heads":
        raise DataError(f"router {config.router!r} does not take text conditioning; a "
                        "text-conditional store uses router 'heads' (or train with --no-text)")
    for d in datasets:
        if d.captions is None:
            raise DataError(f"contributor {d.contributor_id!r} has no captions (captions.csv "
                            "or a .txt per image), where a text-conditional store needs them "
                            "(or train with --no-text)")
    if public is not None and public_captions is None:
        raise DataError("the public data has no captions (captions.csv or a .txt per "
                        "image); a text-conditional store needs them (or --no-text)")
    return [dataclasses.replace(d, labels=None) for d in datasets]


def _check_public(datasets, public, public_labels, image_shape, labelled, needs) -> None:
    if public is None or len(public) == 0:
        raise DataError(f"{' and '.join(needs)} need(s) public data owned by nobody "
                        "(--public DIR)")
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
                            f"contributors hold; {' and '.join(needs)} need(s) them")


def _build(root: Path, datasets, config: StoreConfig, public, public_labels, image_shape,
           num_labels: int, device, progress: bool, workers: int,
           public_captions: list[str] | None, latent: dict | None = None) -> None:
    scheduler = make_noise_schedule(config.schedule)
    scheduler.save_pretrained(root / "schedule")
    # store_id: what the hosts of a deployment call this store in their shared database
    # (its locks and notifications, shards/coordination.py); a copied folder keeps it
    manifest = {"format": FORMAT, "created_at": now(), "store_id": uuid.uuid4().hex,
                "image_shape": list(image_shape),
                "config": config.to_dict(), "base": None, "contributors": {},
                "classifier": None, "reference": None, "num_labels": num_labels,
                "excluded": {}, "generation": 0}
    base = None
    if latent is not None:  # the pretrained pipeline: its UNet is the base, its CLIP the encoder
        import_pipeline(latent["source"], root / "pipeline")
        manifest["pipeline"] = {**latent, "path": "pipeline"}
        manifest["text"] = text_info(root / "pipeline", "pipeline")
        base = UNet2DConditionModel.from_pretrained(root / "pipeline" / "unet", **LOAD)
        manifest["base"] = {"path": "pipeline/unet", "pretrained": True,
                            "weights_hash": files_hash(root / "pipeline" / "unet")}
    elif public_captions is not None:
        manifest["text"] = dict(encoder_info())
    if config.needs_base() and base is None:
        base, loss = train_base(public, image_shape, config, scheduler, device, progress,
                                public_labels, num_labels, public_captions)
        base.save_pretrained(root / "base")
        manifest["base"] = {"path": "base", "images": len(public), "final_loss": loss,
                            "precision": config.base_train.resolved_precision(device),
                            "data_hash": tensor_hash(public, public_labels, public_captions),
                            "weights_hash": files_hash(root / "base")}
    store = ShardRegistry(root, manifest)
    store.router.setup(root, manifest, public, public_labels, public_captions)
    entries = _write_all(store, datasets, config.kind, scheduler, base, device, progress, workers)
    manifest["contributors"].update((d.contributor_id, entries[d.contributor_id]) for d in datasets)
    store.commit(manifest, store.router.train(store, device, progress))


def _write_all(store: ShardRegistry, datasets, kind: str, scheduler, base, device,
               progress: bool, workers: int) -> dict[str, dict]:
    """`write_contributor` for every contributor: here, or in `workers` spawned
    processes (CPU only). Each shard and head is seeded from its contributor's id, so
    the order and the process they train in change nothing but float rounding of
    the thread count."""
    if workers == 1 or len(datasets) < 2 or device.type != "cpu":
        return {d.contributor_id: write_contributor(store, d, kind, scheduler, base, device, progress)
                for d in tqdm(datasets, desc="shards", disable=not progress)}
    threads = max(1, torch.get_num_threads() // workers)
    entries = {}
    # the largest first, so that the workers finish together
    order = sorted(datasets, key=lambda d: len(d.images), reverse=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(_write_in_worker, str(store.root), store.manifest, d, kind):
                   d.contributor_id for d in order}
        bar = tqdm(as_completed(futures), total=len(futures), disable=not progress,
                   desc=f"shards ({workers} processes x {threads} thread(s))")
        for future in bar:
            entries[futures[future]] = future.result()
    return entries


def _write_in_worker(root: str, manifest: dict, data: ContributorData, kind: str) -> dict:
    """In a worker process: the store being built, its schedule and base from disk."""
    store = ShardRegistry(root, manifest)
    return write_contributor(store, data, kind, store.noise_schedule(), store.load_base(),
                             torch.device("cpu"), progress=False)


def write_contributor(store: ShardRegistry, data: ContributorData, kind: str,
                      scheduler: DDPMScheduler, base: UNet2DModel | None, device,
                      progress: bool) -> dict:
    """Train and write shards/<id>, the router's part of <id>, and data/<id> where
    configured; each folder is staged and renamed. Returns the manifest entry, which
    the caller switches in: until the manifest names <id>, these folders are orphans."""
    cid = data.contributor_id
    if store.text:  # conditioned on captions: labels, if any, are not used
        data = dataclasses.replace(data, labels=None)
    model, meta = train_shard(data, kind, store.config, scheduler, base, device, progress,
                              store.num_labels, encoder=store.text_encoder())
    staging = store.root / "shards" / f".{cid}.partial"
    weights_hash = save_shard(model, meta, staging, diffusers_lora=bool(store.pipeline) and kind == "lora")
    entry = {**meta, "path": f"shards/{cid}", "data_path": None,
             "weights_hash": weights_hash, "added_at": now()}
    entry.update(store.router.contributor_part(store, data, scheduler, device, progress))
    shard_dir, data_dir = store.root / "shards" / cid, store.root / "data" / cid
    for orphan in (shard_dir, data_dir):  # left by a crash before a manifest switch
        shutil.rmtree(orphan, ignore_errors=True)
    if store.config.keeps_data:
        data_staging = store.root / "data" / f".{cid}.partial"
        data_staging.mkdir(parents=True)
        kept = {"images": data.images.contiguous()}
        if data.labels is not None:
            kept["labels"] = data.labels.contiguous()
        meta_kept = {"data_hash": data.data_hash}
        if store.text:
            meta_kept["captions"] = json.dumps(list(data.captions))
        save_file(kept, str(data_staging / "images.safetensors"), metadata=meta_kept)
        os.replace(data_staging, data_dir)
        entry["data_path"] = f"data/{cid}"
    os.replace(staging, shard_dir)
    return entry


def add_contributor(store: ShardRegistry, data: ContributorData, kind: str | None = None,
                    device: str | None = None, progress: bool = True) -> dict:
    """Train a shard for a new contributor, then its router part (router.py: a head of
    its own, or the joint classifier extended); returns the new manifest entry.

    Raises:
        DataError: the id is already live or excluded, the image shape or labels do not
            fit the store, or a LoRA shard in a store without a public base.
        StoreError: the router refuses an add now (joint: a purge is pending; checked
            again under the write lock, as an exclusion may land while it trains).
    """
    kind = kind or store.config.kind
    cid = validate_contributor_id(data.contributor_id)
    with store.work_lock():  # one add at a time; a purge of someone else goes on
        check_add(store, data, kind)
        data = store.model_space(data, progress)  # latents in a store on a pipeline
        dev = pick_device(device)
        scheduler = store.noise_schedule()
        base = store.load_base() if store.config.needs_base(kind) else None
        cleanup_orphans(store)
        entry = write_contributor(store, data, kind, scheduler, base, dev, progress)
        crashpoint("add:shard-written")
        update = store.router.extend(store, data, dev, progress)
        with store.write_lock():
            _check_addable(store, data, kind)
            manifest = copy.deepcopy(store.manifest)
            manifest["contributors"][cid] = entry
            store.commit(manifest, update)
        return entry


def check_add(store: ShardRegistry, data: ContributorData, kind: str | None = None) -> None:
    """Everything `add_contributor` checks before it trains (its DataError and
    StoreError), for callers that admit an add now and train it later."""
    kind = kind or store.config.kind
    _check_addable(store, data, kind)
    check_same_shape([data], store.pixel_shape)
    _check_labels(store, data)


def _check_addable(store: ShardRegistry, data: ContributorData, kind: str) -> None:
    cid = data.contributor_id
    if cid in store.manifest["contributors"]:
        raise DataError(f"contributor {cid!r} is already in the store")
    if cid in store.manifest["excluded"]:
        raise DataError(f"contributor {cid!r} is being forgotten; add it after the purge")
    store.router.check_state(store)
    if store.config.needs_base(kind) and store.manifest["base"] is None:
        raise DataError("this store has no public base model; add with --kind full")


def _check_labels(store: ShardRegistry, data: ContributorData) -> None:
    """A labelled store takes labelled data with labels it knows (and that the router
    can take); an unlabelled one takes unlabelled data; a text store captioned data."""
    if store.text:
        if data.captions is None:
            raise DataError(f"contributor {data.contributor_id!r} has no captions (captions.csv "
                            "or a .txt per image); this store is text-conditional")
        store.text_encoder()  # trained with the store's encoder, or not at all
        return
    check_same_labelling([data], labelled=store.num_labels > 0)
    if store.num_labels:
        unknown = sorted(y for y in data.label_counts() if y >= store.num_labels)
        if unknown:
            raise DataError(f"contributor {data.contributor_id!r} has label(s) {unknown} "
                            f"(folder {unknown[0]}/ or its labels.csv rows), which this store "
                            f"does not know; allowed: 0..{store.num_labels - 1} (fixed when the "
                            "store was created)")
    store.router.check_data(store, data)
