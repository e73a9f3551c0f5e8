"""API keys, roles and licences.

A key reads `cdm_<key_id>_<secret>`, the secret 192 random bits. Only `key_id` and
HMAC-SHA-256(server secret, secret) are stored: with that much entropy a keyed hash
is as safe as a slow one, and it is cheap and constant-time, so an unknown key id
(checked against a dummy hash) costs microseconds, not a 16 MiB scrypt. Keys made
before carry a salted scrypt hash; their next successful check upgrades it. Every
check reads the key's row, so a revocation or an expiry counts on the next request,
in every worker. Failed checks are rate limited per key id (per client address when
the header holds no key id).

A principal is a user name, a role and a licence:
  user         generates with the contributors it is licensed for; sees its own requests
  contributor  acts for one contributor: its own credit and history, its own forgetting
  admin        everything
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from shards.data import validate_contributor_id
from shards.settings import ROLES, env_int

from .db import Database
from .errors import AuthError, ForbiddenError, RateLimitError

SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # keys made before HMAC
HMAC_SECRET = "key-hmac"  # the server secret's name in the database
_DUMMY_HASH = secrets.token_bytes(32)


@dataclass(frozen=True)
class Principal:
    user: str
    role: str
    license: frozenset[str] | None  # None: every contributor
    key_id: str = ""
    contributor_id: str | None = None  # role contributor: whom it acts for

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        if not self.is_admin:
            raise ForbiddenError(f"user {self.user!r} is not an admin")

    def may_act_for(self, contributor_id: str) -> bool:
        return self.is_admin or (self.role == "contributor" and self.contributor_id == contributor_id)

    def check_license(self, contributor_ids) -> None:
        """Raises ForbiddenError naming every contributor the key is not licensed for."""
        if self.license is None:
            return
        missing = sorted(set(contributor_ids) - self.license)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ForbiddenError(f"key of {self.user!r} is not licensed for: {shown}")


def _hmac(secret: str, server_secret: bytes) -> bytes:
    return hmac.new(server_secret, secret.encode(), hashlib.sha256).digest()


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def create_key(db: Database, user: str, license: list[str] | None, role: str = "user",
               expires_days: float | None = None, contributor_id: str | None = None) -> str:
    """Store a new key and return it; it cannot be recovered later.

    Raises:
        ValueError: unknown role, bad user name, expiry not positive, a contributor
            key without a contributor id (or another role with one).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}; allowed: {list(ROLES)}")
    if not user or len(user) > 128:
        raise ValueError("user must be 1 to 128 characters")
    if (role == "contributor") != (contributor_id is not None):
        raise ValueError("a contributor key names exactly one contributor (--contributor ID); "
                         "other roles name none")
    if contributor_id is not None:
        validate_contributor_id(contributor_id)
        license = []  # a contributor key does not generate
    if expires_days is not None and not expires_days > 0:
        raise ValueError(f"expires_days={expires_days!r}; allowed: a number > 0")
    expires_at = time.time() + expires_days * 86400 if expires_days is not None else None
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    db.insert_key(key_id, user, role, sorted(license) if license is not None else None,
                  b"", _hmac(secret, db.secret(HMAC_SECRET)), expires_at, contributor_id)
    return f"cdm_{key_id}_{secret}"


class FailureLimiter:
    """At most `limit` failed key checks per key id (or per client address, for a
    header with no key id) in any `window` seconds; beyond, they are refused without a
    key check until the oldest failure leaves the window. Per process: with W workers
    up to W x limit."""

    def __init__(self, limit: int | None = None, window: float = 60.0,
                 max_clients: int = 100_000):
        """`limit` default: CDM_AUTH_FAILURES_PER_MINUTE (20)."""
        limit = env_int("CDM_AUTH_FAILURES_PER_MINUTE") if limit is None else limit
        self.limit, self.window, self.max_clients = limit, window, max_clients
        self._failures: dict[str, deque] = {}
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(client)
            while times and times[0] <= now - self.window:
                times.popleft()
            if times is not None and len(times) >= self.limit:
                raise RateLimitError("too many failed checks of this API key (or, without a key "
                                     "id, from this client); retry later",
                                     times[0] + self.window - now)

    def fail(self, client: str) -> None:
        with self._lock:
            if len(self._failures) >= self.max_clients:  # bounded memory under a flood
                self._failures.clear()
            self._failures.setdefault(client, deque()).append(time.monotonic())


class KeyVerifier:
    """Maps an `Authorization` header (and the client's address) to a Principal."""

    def __init__(self, db: Database, limiter: FailureLimiter | None = None):
        self.db = db
        self.limiter = limiter or FailureLimiter()
        self._verified: dict[bytes, bytes] = {}  # sha256(key) -> the stored hash it matched
        self._lock = threading.Lock()
        self._server_secret: bytes | None = None

    def __call__(self, authorization: str | None, client: str = "-") -> Principal:
        key = (authorization or "").partition(" ")[2].strip()
        digest = hashlib.sha256(key.encode()).digest()
        parts = key.split("_", 2)
        who = f"key {parts[1]}" if len(parts) == 3 and parts[0] == "cdm" and parts[1] \
            else f"client {client}"
        with self._lock:
            known = self._verified.get(digest) if key else None
        if known is None:  # keys this process verified are not limited
            self.limiter.check(who)
        try:
            return self._verify(authorization, digest, known)
        except AuthError:
            self.limiter.fail(who)
            raise

    @property
    def server_secret(self) -> bytes:
        if self._server_secret is None:
            self._server_secret = self.db.secret(HMAC_SECRET)
        return self._server_secret

    def _verify(self, authorization: str | None, digest: bytes, known: bytes | None) -> Principal:
        """`digest`: sha256 of the header's key; `known`: the stored hash this process
        verified that key against, if it did."""
        if not authorization:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or len(key) > 256:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        parts = key.split("_", 2)
        well_formed = len(parts) == 3 and parts[0] == "cdm"
        row = self.db.get_key(parts[1]) if well_formed else None
        stored = row["key_hash"] if row is not None else _DUMMY_HASH
        if known is None or not hmac.compare_digest(known, stored):
            secret = parts[2] if well_formed else key
            legacy = row is not None and row["scheme"] is None
            computed = _scrypt(secret, row["salt"]) if legacy else _hmac(secret, self.server_secret)
            if not hmac.compare_digest(computed, stored) or row is None:
                raise AuthError("invalid API key")
            if legacy:  # the next check is cheap: the hash the key is stored under now
                stored = _hmac(secret, self.server_secret)
                self.db.rehash_key(row["key_id"], stored)
            with self._lock:
                self._verified[digest] = stored
        if row["revoked_at"] is not None:
            raise AuthError("API key revoked")
        if row["expires_at"] is not None and row["expires_at"] <= time.time():
            raise AuthError("API key expired")
        license = json.loads(row["license"])
        return Principal(row["user"], row["role"], None if license is None else frozenset(license),
                         row["key_id"], row["contributor_id"])
