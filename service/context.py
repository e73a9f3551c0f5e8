"""What one server process shares between the `Gate` (which BentoML builds) and the
service object: one database handle and one key verifier per store, so a key checked
by the Gate is cached once and the failed-key limiter counts in one place."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from .auth import FailureLimiter, KeyVerifier
from .db import DB_FILE, Database


@dataclass(frozen=True)
class Shared:
    db: Database
    verify: KeyVerifier


@functools.cache
def _shared(root: Path) -> Shared:
    db = Database(root / DB_FILE)
    return Shared(db, KeyVerifier(db, FailureLimiter()))


def shared(store_root: str | Path) -> Shared:
    """This process's database and key verifier of the store at `store_root`."""
    return _shared(Path(store_root).resolve())
