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
import shutil
import uuid
from pathlib import Path

from .files import read_weights, weights_hash
from .settings import LOCAL_CACHE_ENV, env_str


class LocalCache:
    """The local copies of one store's shards on this host."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def for_store(cls, root: Path, store_key: str) -> LocalCache | None:
        """The cache of the store at `root` under CDM_LOCAL_CACHE, or None when unset.
        Stores are told apart by their path on this host and `store_key`."""
        base = env_str(LOCAL_CACHE_ENV, "")
        if not base:
            return None
        name = hashlib.sha256(f"{Path(root).resolve()}\n{store_key}".encode()).hexdigest()[:16]
        return cls(Path(base) / name)

    def read(self, contributor_id: str, folder: Path, expected: str) -> dict[str, bytes]:
        """The shard files of `contributor_id` with weights hash `expected`: the local
        copy when it has that hash, else the files in `folder` (copied here when they
        have it). What is returned is checked by the caller, as without a cache."""
        local = self.folder / contributor_id / expected
        try:
            files = read_weights(local)
        except OSError:  # pruned while being read
            files = {}
        if files and weights_hash(files) == expected:
            return files
        files = read_weights(folder)
        if files and weights_hash(files) == expected:
            self._keep(local, files)
        return files

    def _keep(self, local: Path, files: dict[str, bytes]) -> None:
        """Write a verified copy: a staging folder renamed into place."""
        staging = local.parent / f".{local.name}.{uuid.uuid4().hex}.partial"
        try:
            staging.mkdir(parents=True)
            for name, data in files.items():
                (staging / name).write_bytes(data)
            shutil.rmtree(local, ignore_errors=True)  # a copy that failed its check
            staging.rename(local)
        except OSError:  # a full disk or a racing writer: the volume is still there
            shutil.rmtree(staging, ignore_errors=True)

    def prune(self, live: dict[str, str]) -> list[str]:
        """Delete the copies of contributors not in `live` ({id: weights hash}) and of
        other hashes than theirs, and leftover staging folders; returns what went."""
        if not self.folder.is_dir():
            return []
        gone = []
        for who in sorted(self.folder.iterdir()):
            keep = live.get(who.name)
            for copy in sorted(who.iterdir()) if who.is_dir() else [who]:
                if copy.name != keep:
                    shutil.rmtree(copy, ignore_errors=True) if copy.is_dir() else copy.unlink()
                    gone.append(f"{who.name}/{copy.name}")
            if keep is None:
                shutil.rmtree(who, ignore_errors=True)
        return gone
