"""The disk cache of utilities: U(S) of every coalition a valuation evaluated, and the
samples it measured them on, under STORE/valuation/cache/, so a later run (another
method, another property of the same samples) computes nothing twice.

An entry records `depends_on`, the contributors whose data shaped the number (for
composition: S with the per-contributor heads router; every contributor the joint
classifier was trained on with that router). Forgetting c deletes every entry that
depends on c, and everything that cannot say what it depends on: temporary files of
interrupted writes, and entries or sample files that cannot be read. `CLEANER` runs
that at every purge, whoever calls it (an entry point in pyproject.toml, and
registered when this module is imported).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shards.files import write_json_atomic
from shards.forgetting import Cleaner, register_cleaner

# Temporary files under the cache: ours and write_json_atomic's (`.<name>.<random>.tmp`),
# and safetensors' own (`.tmpXXXXXX`, which save_file writes and then renames).
TMP_PATTERNS = ("*.tmp", ".tmp*")


class UtilityCache:
    """JSON entries under `root/<method>/<key>.json`, written atomically; sampled
    images under `root/samples/<key>.safetensors` (so every property of a coalition
    is measured on one sampling run), with `depends_on` in the file's metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get(self, method: str, key: str) -> dict | None:
        path = self.root / method / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, method: str, key: str, entry: dict) -> None:
        """Write one entry atomically (through a `.<name>.<random>.tmp` file). If a
        concurrent `drop` deleted the temporary file, the entry is not cached."""
        (self.root / method).mkdir(parents=True, exist_ok=True)
        try:
            write_json_atomic(self.root / method / f"{key}.json", entry)
        except FileNotFoundError:
            pass  # a forget ran meanwhile: caching is optional, publishing untrusted is not

    def entries(self) -> list[tuple[Path, dict]]:
        return [(p, json.loads(p.read_text())) for p in sorted(self.root.glob("*/*.json"))]

    def get_images(self, key: str) -> torch.Tensor | None:
        path = self.root / "samples" / f"{key}.safetensors"
        return load_file(str(path))["images"] if path.exists() else None

    def put_images(self, key: str, images: torch.Tensor, depends_on: list[str]) -> None:
        """Write the samples of `key` atomically, through a `.<key>.<random>.tmp` file
        (unique, so that concurrent writers of one key do not share it). If a concurrent
        `drop` deleted the temporary file, the samples are not cached."""
        folder = self.root / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file({"images": images.contiguous()}, str(tmp),
                      metadata={"depends_on": json.dumps(sorted(depends_on))})
            os.replace(tmp, folder / f"{key}.safetensors")
        except FileNotFoundError:
            pass  # a forget ran meanwhile (see `put`)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def drop(self, contributor_id: str) -> int:
        """Delete every entry and every sample file that depends on `contributor_id`'s
        data, and every file that cannot say what it depends on: the temporary files of
        writes in progress or interrupted (`TMP_PATTERNS`, whoever they are for: a
        write in progress then skips caching), entries and sample files that cannot be
        read. Returns how many files were deleted."""
        dropped = 0
        for path in sorted(self.root.glob("*/*.json")):
            try:
                depends_on = json.loads(path.read_text())["depends_on"]
            except (OSError, ValueError, KeyError, TypeError):
                depends_on = None  # unreadable: untrusted
            if depends_on is None or contributor_id in depends_on:
                dropped += _unlink(path)
        for path in sorted(self.root.glob("samples/*.safetensors")):
            try:
                with safe_open(str(path), "pt") as f:
                    depends_on = json.loads(f.metadata()["depends_on"])
            except Exception:  # truncated or foreign; safetensors raises its own errors
                depends_on = None
            if depends_on is None or contributor_id in depends_on:
                dropped += _unlink(path)
        for path in sorted({p for pattern in TMP_PATTERNS for p in self.root.rglob(pattern)}):
            if path.is_file():
                dropped += _unlink(path)
        return dropped


def _unlink(path: Path) -> int:
    """Delete file `path`; 1 if this call deleted it, 0 if it was gone already."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def publish_if_live(store, depends_on, write: Callable[[], None]) -> bool:
    """Run `write` (which caches something derived from the contributors `depends_on`)
    only if every one of them is live, under the store's write lock: an exclusion is
    then either seen here (nothing is written) or comes after, and its purge's cleaner
    deletes what was written. A valuation that runs beside a purge thus caches nothing
    of the contributor being forgotten. Returns whether it wrote. No store (a
    closed-form game): written."""
    if store is None:
        write()
        return True
    with store.write_lock():
        if not set(depends_on) <= set(store.contributor_ids):
            return False
        write()
        return True


def store_cache(store) -> UtilityCache:
    """The utility cache of a store (a ShardStore, or its folder as a str or Path)."""
    root = Path(store) if isinstance(store, str | Path) else store.root
    return UtilityCache(root / "valuation" / "cache")


def drop_from_store(store_root: str | Path, contributor_id: str) -> int:
    """The cleaner's call (shards/forgetting.py): drop what depends on the contributor
    from the store's utility cache."""
    return store_cache(store_root).drop(contributor_id)


CLEANER = Cleaner("valuation-cache", "valuation", drop_from_store)
register_cleaner(CLEANER)  # also where the package is not installed (no entry points)
