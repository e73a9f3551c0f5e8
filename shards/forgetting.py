"""Forgetting a contributor, exactly, in two stages (docs/operations.md, "Forgetting"):

1. `exclude`: the live registry drops the contributor (one atomic manifest write);
   from then on no request that starts, in any process, can use it.
2. `purge`: everything derived from its data is deleted: first what other parts of the
   system derived from it (every registered `Cleaner`: valuation caches, pruned bases,
   recorded valuations), then its shard, its part of the router and its kept data;
   the router's shared part is retrained where it saw the data (router `joint`); the
   exclusion record leaves the manifest last. Idempotent after a crash at any point.

Cleaners are how the guarantee holds for any caller (the library, the CLI, the
service) without `shards` importing the packages that derive data: a package declares
its cleaners as entry points of the group `cdm_serve.cleaners` (pyproject.toml), or
calls `register_cleaner`. Each owns a top-level name in the store; a purge refuses to
run over a store holding a name that neither the store nor any cleaner owns, rather
than leave derived data behind.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from .errors import StoreError
from .faults import crashpoint
from .files import sweep
from .models import pick_device
from .registry import ShardRegistry, now

CLEANERS_GROUP = "cdm_serve.cleaners"
# top-level names of a store that the store itself manages (dot-files: locks, temps);
# `pipeline` (a pretrained latent base, pipeline.py) is copied in, trained on no
# contributor's data
STORE_OWNS = ("manifest.json", "schedule", "shards", "router", "reference", "data",
              "classifier", "base", "pipeline")


@dataclass(frozen=True)
class Cleaner:
    """Deletes what derives from a contributor's data in `owns` (a store-relative
    top-level folder or file prefix): `drop(store_root, contributor_id)` returns how
    many entries it deleted, and must be idempotent."""

    name: str
    owns: str
    drop: Callable[[Path, str], int]


_registered: dict[str, Cleaner] = {}


def register_cleaner(cleaner: Cleaner) -> None:
    """Run `cleaner` at every purge of this process (besides the entry points)."""
    _registered[cleaner.name] = cleaner


def cleaners() -> list[Cleaner]:
    """The installed cleaners (entry points) and the registered ones, by name.

    Raises:
        StoreError: an installed cleaner cannot be loaded (nothing is deleted then).
    """
    found = {}
    for ep in entry_points(group=CLEANERS_GROUP):
        try:
            cleaner = ep.load()
        except (ImportError, AttributeError) as err:
            raise StoreError(f"cleaner {ep.name!r} ({ep.value}) cannot be loaded: {err}; "
                             "reinstall the package that declares it (pip install -e .)") from err
        found[cleaner.name] = cleaner
    return [c for _, c in sorted({**found, **_registered}.items())]


def _owned(name: str, owners) -> bool:
    """Whether top-level entry `name` is one of `owners` (or an SQLite companion of
    one: `service.db-wal`, `-shm`, `-journal`)."""
    return any(name == o or name in (f"{o}-wal", f"{o}-shm", f"{o}-journal") for o in owners)


def _check_owned(store: ShardRegistry, installed: list[Cleaner]) -> None:
    owned = [*STORE_OWNS, *(c.owns for c in installed)]
    for path in store.root.iterdir():
        if not path.name.startswith(".") and not _owned(path.name, owned):
            raise StoreError(f"store {store.root} holds {path.name}, which no installed "
                             "cleaner owns: a purge could leave data derived from the "
                             "contributor there; install the package that wrote it "
                             "(pip install -e .) and purge again")


def exclude(store: ShardRegistry, contributor_id: str, requested_by: dict | None = None) -> dict:
    """Stage 1: drop `contributor_id` from the live registry (one atomic manifest write
    under the write lock, seen by every process at its next `refresh`). Its files stay
    until `purge`; the exclusion record keeps `requested_by` (who asked: a crash before
    the request's own records must not lose it) until then. Returns its entry.

    Raises:
        UnknownContributorError: it is not live.
    """
    with store.write_lock():
        entry = store.contributor(contributor_id)
        manifest = copy.deepcopy(store.manifest)
        del manifest["contributors"][contributor_id]
        manifest["excluded"][contributor_id] = {**entry, "excluded_at": now(),
                                                "generation": store.generation + 1,
                                                "requested_by": requested_by}
        store.commit(manifest)
    return entry


def derived_paths(store: ShardRegistry, contributor_id: str, entry: dict,
                  staging: bool = True) -> list[str]:
    """Store-relative folders derived from the contributor alone: its shard, its part
    of the router, its kept data (and, with `staging`, the partial folders an
    interrupted add may have left)."""
    router = store.router
    paths = [entry["path"], *router.derived_paths(contributor_id, entry), entry.get("data_path")]
    if staging:
        paths += [f"shards/.{contributor_id}.partial", *router.staging_paths(contributor_id),
                  f"data/.{contributor_id}.partial"]
    return [p for p in paths if p]


def purge_plan(store: ShardRegistry, contributor_id: str) -> dict:
    """The audit record `purge` returns, from the exclusion record.

    Raises:
        StoreError: `contributor_id` is not excluded (never was, or already purged).
    """
    store.refresh()
    entry = store.manifest["excluded"].get(contributor_id)
    if entry is None:
        raise StoreError(f"contributor {contributor_id!r} is not excluded; forget it first")
    return {"contributor_id": contributor_id, "data_hash": entry["data_hash"],
            "weights_hash": entry["weights_hash"],
            "deleted": derived_paths(store, contributor_id, entry, staging=False),
            "retrained": store.router.retrains, **store.router.audit(store, entry)}


def purge(store: ShardRegistry, contributor_id: str, device: str | None = None,
          progress: bool = False) -> dict:
    """Stage 2: delete everything derived from the excluded contributor and drop its
    exclusion record (module docstring). Returns the audit record: `purge_plan`'s, with
    what each cleaner deleted (`derived_dropped`, and their sum
    `valuation_caches_dropped`) and the router after the purge.

    Raises:
        StoreError: `contributor_id` was not excluded first, or the store holds data no
            installed cleaner owns (nothing is deleted then).
    """
    with store.admin_lock():
        audit = purge_plan(store, contributor_id)
        installed = cleaners()
        _check_owned(store, installed)
        dropped = {c.name: c.drop(store.root, contributor_id) for c in installed}
        audit["derived_dropped"] = dropped
        audit["valuation_caches_dropped"] = sum(dropped.values())
        crashpoint("purge:caches-dropped")
        entry = store.manifest["excluded"][contributor_id]
        for rel in derived_paths(store, contributor_id, entry):
            if (store.root / rel).exists():
                shutil.rmtree(store.root / rel)
        crashpoint("purge:files-deleted")
        # the router's shared part from scratch on the others (joint; what heads share
        # is public and stays)
        update = store.router.train(store, pick_device(device), progress)
        with store.write_lock():
            manifest = copy.deepcopy(store.manifest)
            del manifest["excluded"][contributor_id]
            store.commit(manifest, update)
        audit.update(store.router.audit(store, None))
        return audit


def cleanup_orphans(store: ShardRegistry) -> list[str]:
    """Delete staging folders and folders of contributors the manifest does not name
    (left by an add that crashed before its manifest switch), and router folders the
    manifest does not name. Returns the store-relative paths deleted. Takes the work
    lock (no add is mid-way) and the write lock (a purge's new classifier version is
    written and named in one step)."""
    with store.work_lock(), store.write_lock():
        known = set(store.manifest["contributors"]) | set(store.manifest["excluded"])
        deleted = sweep(store.root, "shards", known) + sweep(store.root, "data", known)
        return deleted + store.router.orphans(store)
