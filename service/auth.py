"""API keys and licences.

A key reads `cdm_<key_id>_<secret>`. Only `key_id`, a random salt and
scrypt(secret, salt) are stored; verification recomputes the hash and compares in
constant time. A principal is a user name, a role (user or admin) and a licence:
the contributor ids the key may generate with, or None for all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass

from shards.errors import CDMError

from .db import Database

SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
ROLES = ("user", "admin")


class AuthError(CDMError):
    """Missing or invalid API key (HTTP 401)."""


class ForbiddenError(CDMError):
    """A valid key without the right (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    user: str
    role: str
    license: frozenset[str] | None  # None: every contributor

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        if not self.is_admin:
            raise ForbiddenError(f"user {self.user!r} is not an admin")

    def check_license(self, contributor_ids) -> None:
        """Raises ForbiddenError naming every contributor the key is not licensed for."""
        if self.license is None:
            return
        missing = sorted(set(contributor_ids) - self.license)
        if missing:
            raise ForbiddenError(f"key of {self.user!r} is not licensed for: {', '.join(missing)}")


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def create_key(db: Database, user: str, license: list[str] | None, role: str = "user") -> str:
    """Store a new key and return it; it cannot be recovered later."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; allowed: {list(ROLES)}")
    if not user or len(user) > 128:
        raise ValueError("user must be 1 to 128 characters")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(24), secrets.token_bytes(16)
    db.insert_key(key_id, user, role, sorted(license) if license is not None else None,
                  salt, _hash(secret, salt))
    return f"cdm_{key_id}_{secret}"


class KeyVerifier:
    """Maps an `Authorization` header to a Principal; caches verified keys by their
    sha256 so scrypt runs once per key per process."""

    def __init__(self, db: Database):
        self.db = db
        self._cache: dict[bytes, Principal] = {}
        self._lock = threading.Lock()

    def __call__(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        key = key.strip()
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            return cached
        parts = key.split("_", 2)
        row = self.db.get_key(parts[1]) if len(parts) == 3 and parts[0] == "cdm" else None
        if row is None or not hmac.compare_digest(_hash(parts[2], row["salt"]), row["key_hash"]):
            raise AuthError("invalid API key")
        license = json.loads(row["license"])
        principal = Principal(row["user"], row["role"], None if license is None else frozenset(license))
        with self._lock:
            self._cache[digest] = principal
        return principal
