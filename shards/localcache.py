"""A host's local copies of shard weights, for a store on shared storage (a network
volume every host mounts): `CDM_LOCAL_CACHE=DIR` on a host makes each shard's files
read from the volume once, then from DIR.

A copy is named by contributor and weights hash (DIR/<store>/<id>/<hash>/) and is
checked against that hash on every read, so a copy never stands in for other
weights. `prune(live)` deletes every copy whose contributor is not live with that
hash; every process prunes when it sees a new manifest generation (its own commit,
or another host's at its next refresh: the service's job runners refresh at once
when another host commits, and at start). So a forgotten contributor's copies leave
every running host's disk when that host learns of the exclusion, and a host that
was down leaves them when it starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from .files import read_verified
from .settings import LOCAL_CACHE_ENV, env_str

STAGING_S = 600  # a staging folder older than this was left by a crash


class LocalCache:
    """The local copies of one store's shards on this host."""

    def __init__(self, folder: Path, manifest: Path | None = None):
        self.folder = Path(folder)
        self.manifest = manifest  # the store's manifest.json: a copy is kept only if live

    @classmethod
    def for_store(cls, root: Path, store_key: str) -> LocalCache | None:
        """The cache of the store at `root` under CDM_LOCAL_CACHE, or None when unset.
        Stores are told apart by their path on this host and `store_key`."""
        base = env_str(LOCAL_CACHE_ENV, "")
        if not base:
            return None
        name = hashlib.sha256(f"{Path(root).resolve()}\n{store_key}".encode()).hexdigest()[:16]
        return cls(Path(base) / name, Path(root) / "manifest.json")

    def read(self, contributor_id: str, folder: Path, expected: str) -> dict[str, bytes]:
        """The shard files of `contributor_id` with weights hash `expected`: the local
        copy when it has that hash, else the files in `folder` when they have it
        (copied here), else {} (the caller's "purged or replaced")."""
        local = self.folder / contributor_id / expected
        try:
            files = read_verified(local, expected)  # {} when tampered with
        except OSError:  # pruned while being read
            files = {}
        if files:
            return files
        files = read_verified(folder, expected)
        if files:
            self._keep(contributor_id, local, files, expected)
        return files

    def _keep(self, contributor_id: str, local: Path, files: dict[str, bytes],
              expected: str) -> None:
        """Write a verified copy (a staging folder renamed into place), and keep it
        only if the store's manifest, read after the rename, has the contributor live
        with these weights: a shard read by a request that started before its
        exclusion is not copied, and a copy that raced a prune does not outlive it."""
        staging = local.parent / f".{local.name}.{uuid.uuid4().hex}.partial"
        try:
            staging.mkdir(parents=True)
            for name, data in files.items():
                (staging / name).write_bytes(data)
            shutil.rmtree(local, ignore_errors=True)  # a copy that failed its check
            staging.rename(local)
        except OSError:  # a full disk or a racing writer: the volume is still there
            shutil.rmtree(staging, ignore_errors=True)
            return
        if not self._live(contributor_id, expected):
            shutil.rmtree(local, ignore_errors=True)

    def _live(self, contributor_id: str, expected: str) -> bool:
        if self.manifest is None:
            return True
        try:
            live = json.loads(self.manifest.read_text())["contributors"]
        except (OSError, ValueError, KeyError):  # unreadable now: keep no copy
            return False
        return live.get(contributor_id, {}).get("weights_hash") == expected

    def prune(self, live: dict[str, str]) -> list[str]:
        """Delete the copies of contributors not in `live` ({id: weights hash}) and of
        other hashes than theirs, and staging folders left by a crash (older than
        STAGING_S: a younger one is a copy being written); returns what went. Safe
        beside other pruners and readers: what another deleted first is skipped."""
        gone = []
        for who in _children(self.folder):
            keep = live.get(who.name)
            for copy in _children(who) if who.is_dir() else [who]:
                if copy.name == keep or (copy.name.endswith(".partial") and _age(copy) < STAGING_S):
                    continue
                if copy.is_dir():
                    shutil.rmtree(copy, ignore_errors=True)
                else:
                    copy.unlink(missing_ok=True)
                gone.append(f"{who.name}/{copy.name}")
            if keep is None and not _children(who):
                shutil.rmtree(who, ignore_errors=True)
        return gone


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
