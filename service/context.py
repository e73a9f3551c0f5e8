"""What one server process shares between the `Gate` (which BentoML builds) and the
service object: one database handle and one key verifier per store, so a key checked
by the Gate is cached once and the failed-key limiter counts in one place; and the
cleaner of the valuations recorded in the store's database (shards/forgetting.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from shards.forgetting import Cleaner, register_cleaner

from .auth import FailureLimiter, KeyVerifier
from .db import DB_FILE, Database, open_database
from .sql import database_url


@dataclass(frozen=True)
class Shared:
    db: Database
    verify: KeyVerifier


@functools.cache
def _shared(root: Path) -> Shared:
    db = open_database(root)
    return Shared(db, KeyVerifier(db, FailureLimiter()))


def shared(store_root: str | Path) -> Shared:
    """This process's database and key verifier of the store at `store_root`."""
    return _shared(Path(store_root).resolve())


def separate(store_root: str | Path) -> Shared:
    """A database handle and key verifier of their own (for a second in-process
    worker in tests, which must not share the first one's caches)."""
    db = open_database(store_root)
    return Shared(db, KeyVerifier(db, FailureLimiter()))


def drop_recorded_valuations(store_root: str | Path, contributor_id: str) -> int:
    """The cleaner's call (shards/forgetting.py): delete the recorded valuations that
    value `contributor_id` (their player set no longer exists)."""
    where = database_url(store_root)
    if "://" not in where and not Path(where).exists():  # no SQLite file: nothing recorded
        return 0
    return shared(store_root).db.drop_valuations(contributor_id)


CLEANER = Cleaner("recorded-valuations", DB_FILE, drop_recorded_valuations)
register_cleaner(CLEANER)  # also where the package is not installed (no entry points)
