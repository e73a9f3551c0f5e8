"""SQLite state of the service: API keys (hashed), the credit ledger, the forgetting
audit log, background jobs, per-key spend and the requests in flight in every
worker. WAL journal with synchronous=FULL: a transaction that returned is on disk,
so a request acknowledged with 200 survives a kill right after. Every worker and
replica of one store opens the same file; SQLite serialises their writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

DB_FILE = "service.db"  # in the store's folder

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL,
    license TEXT NOT NULL, salt BLOB NOT NULL, key_hash BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, user TEXT NOT NULL, created_at REAL NOT NULL,
    params TEXT NOT NULL, contributors TEXT NOT NULL, attribution TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credit (
    request_id TEXT NOT NULL REFERENCES requests(request_id), contributor_id TEXT NOT NULL,
    samples INTEGER NOT NULL, mass REAL NOT NULL, PRIMARY KEY (request_id, contributor_id));
CREATE INDEX IF NOT EXISTS credit_by_contributor ON credit (contributor_id);
CREATE INDEX IF NOT EXISTS requests_by_user ON requests (user, created_at);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, contributor_id TEXT NOT NULL, details TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, actor TEXT NOT NULL, params TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL, result TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS valuations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, property TEXT NOT NULL,
    method TEXT NOT NULL, values_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS payout_policy (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    property TEXT NOT NULL, method TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend (
    key_id TEXT NOT NULL, at REAL NOT NULL, cost INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS spend_by_key ON spend (key_id, at);
CREATE TABLE IF NOT EXISTS inflight (
    worker TEXT NOT NULL, seq INTEGER NOT NULL, generation INTEGER NOT NULL,
    started_at REAL NOT NULL, PRIMARY KEY (worker, seq));
CREATE TABLE IF NOT EXISTS workers (
    worker TEXT PRIMARY KEY, started_at REAL NOT NULL, heartbeat_at REAL NOT NULL);
"""
# columns added after the first release; added in place to older databases
# keys.scheme: 'hmac' (HMAC-SHA-256 with the server's secret), NULL: scrypt with the row's
# salt (keys made before; upgraded to hmac at their next successful check)
MIGRATIONS = {"keys": {"expires_at": "REAL", "revoked_at": "REAL", "contributor_id": "TEXT",
                       "scheme": "TEXT"},
              "jobs": {"plan": "TEXT"},
              # 'primary': the run's most exact Shapley values (credit's `shapley`);
              # 'other': another method of the run (a payout policy may name it)
              "valuations": {"kind": "TEXT", "params": "TEXT"},
              # a method's parameters (beta-shapley: alpha, beta) as canonical JSON, NULL
              # for methods without any; a policy pays only by values of its parameters
              "payout_policy": {"params": "TEXT"}}


def _params(params: dict | None) -> str | None:
    """Canonical JSON of a method's parameters (floats), None for none."""
    return json.dumps({k: float(v) for k, v in sorted(params.items())}) if params else None


def _unparams(text: str | None) -> dict | None:
    """The parameters `_params` stored (None for none)."""
    return json.loads(text) if text else None


class Database:
    """One SQLite file; a connection per thread (sqlite3 objects are thread-bound)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)
        with self.transaction() as db:
            for table, columns in MIGRATIONS.items():
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def transaction(self):
        """A context manager holding one write transaction (BEGIN IMMEDIATE, then COMMIT,
        or ROLLBACK on an exception); yields the connection, which the methods that
        take `db=` accept so that several writes commit together."""
        db = self._conn()

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")
                return db

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    # ------------------------------------------------------------------ keys
    def secret(self, name: str) -> bytes:
        """A random 32-byte secret of this database, made at its first use."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO secrets VALUES (?, ?)", (name, os.urandom(32)))
            return bytes(db.execute("SELECT value FROM secrets WHERE name = ?",
                                    (name,)).fetchone()["value"])

    def insert_key(self, key_id: str, user: str, role: str, license: list[str] | None,
                   salt: bytes, key_hash: bytes, expires_at: float | None = None,
                   contributor_id: str | None = None, scheme: str | None = "hmac") -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO keys (key_id, user, role, license, salt, key_hash, created_at, "
                       "expires_at, contributor_id, scheme) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key_id, user, role, json.dumps(license), salt, key_hash, time.time(),
                        expires_at, contributor_id, scheme))

    def rehash_key(self, key_id: str, key_hash: bytes, scheme: str = "hmac") -> None:
        """Store a key's hash under another scheme (a legacy scrypt hash, upgraded)."""
        with self.transaction() as db:
            db.execute("UPDATE keys SET key_hash = ?, salt = ?, scheme = ? WHERE key_id = ?",
                       (key_hash, b"", scheme, key_id))

    def get_key(self, key_id: str) -> sqlite3.Row | None:
        return self._conn().execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()

    def list_keys(self) -> list[dict]:
        rows = self._conn().execute(
            "SELECT key_id, user, role, license, contributor_id, created_at, expires_at, revoked_at "
            "FROM keys ORDER BY created_at").fetchall()
        return [{**dict(r), "license": json.loads(r["license"])} for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked (kept for the audit trail). Returns whether it existed
        and was not already revoked."""
        with self.transaction() as db:
            cur = db.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                             (time.time(), key_id))
            return cur.rowcount == 1

    def revoke_contributor_keys(self, contributor_id: str) -> int:
        """Revoke the keys that act for `contributor_id` (it was forgotten: a later
        contributor with the same id is someone else). Returns how many."""
        with self.transaction() as db:
            return db.execute("UPDATE keys SET revoked_at = ? WHERE contributor_id = ? AND "
                              "revoked_at IS NULL", (time.time(), contributor_id)).rowcount

    # ---------------------------------------------------------------- ledger
    def record_request(self, user: str, params: dict, contributors: list[str],
                       attribution: dict[str, list[float]],
                       db: sqlite3.Connection | None = None) -> str:
        """One row per generate request, and its per-contributor credit, in one
        transaction (or in `db`'s). Returns the request id."""
        if db is None:
            with self.transaction() as db:
                return self.record_request(user, params, contributors, attribution, db)
        request_id = uuid.uuid4().hex
        db.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?)",
                   (request_id, user, time.time(), json.dumps(params),
                    json.dumps(contributors), json.dumps(attribution)))
        n = params["n"]
        db.executemany("INSERT INTO credit VALUES (?, ?, ?, ?)",
                       [(request_id, c, n, float(sum(attribution[c]))) for c in contributors])
        return request_id

    def get_request(self, request_id: str) -> sqlite3.Row | None:
        return self._conn().execute("SELECT * FROM requests WHERE request_id = ?",
                                    (request_id,)).fetchone()

    def credit_totals(self, user: str | None = None) -> dict[str, dict[str, float]]:
        """Samples and attribution mass per contributor, over every request or over
        `user`'s requests only."""
        sql = ("SELECT c.contributor_id, SUM(c.samples) AS samples, SUM(c.mass) AS mass "
               "FROM credit c")
        args: tuple = ()
        if user is not None:
            sql += " JOIN requests r ON r.request_id = c.request_id WHERE r.user = ?"
            args = (user,)
        rows = self._conn().execute(sql + " GROUP BY c.contributor_id", args).fetchall()
        return {r["contributor_id"]: {"samples": int(r["samples"]), "mass": float(r["mass"])}
                for r in rows}

    def history(self, user: str | None = None, contributor_id: str | None = None,
                limit: int = 100, before: float | None = None) -> list[dict]:
        """Newest first: a user's requests (with their contributors), or the requests
        that used a contributor (with its samples and mass, without the user)."""
        before = time.time() + 1 if before is None else before
        if contributor_id is not None:
            rows = self._conn().execute(
                "SELECT r.request_id, r.created_at, c.samples, c.mass FROM credit c "
                "JOIN requests r ON r.request_id = c.request_id "
                "WHERE c.contributor_id = ? AND r.created_at < ? "
                "ORDER BY r.created_at DESC LIMIT ?", (contributor_id, before, limit)).fetchall()
            return [dict(r) for r in rows]
        sql, args = "SELECT * FROM requests WHERE created_at < ?", [before]
        if user is not None:
            sql, args = sql + " AND user = ?", [*args, user]
        rows = self._conn().execute(sql + " ORDER BY created_at DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [{"request_id": r["request_id"], "user": r["user"], "created_at": r["created_at"],
                 "params": json.loads(r["params"]), "contributors": json.loads(r["contributors"])}
                for r in rows]

    # ----------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, contributor_id: str, details: dict,
              db: sqlite3.Connection | None = None) -> dict:
        """Append an audit record; returns it as `audit_log` would."""
        if db is None:
            with self.transaction() as db:
                return self.audit(actor, action, contributor_id, details, db)
        at = time.time()
        cur = db.execute("INSERT INTO audit (at, actor, action, contributor_id, details) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (at, actor, action, contributor_id, json.dumps(details)))
        return {"id": cur.lastrowid, "at": at, "actor": actor, "action": action,
                "contributor_id": contributor_id, "details": details}

    def audit_log(self, contributor_id: str | None = None, limit: int | None = None,
                  newest_first: bool = False) -> list[dict]:
        """Audit records in order (or newest first), of one contributor or all, at most
        `limit`."""
        sql, args = "SELECT * FROM audit", []
        if contributor_id:
            sql, args = sql + " WHERE contributor_id = ?", [contributor_id]
        sql += " ORDER BY id" + (" DESC" if newest_first else "")
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return [{**dict(r), "details": json.loads(r["details"])}
                for r in self._conn().execute(sql, args)]

    def forgotten(self, contributor_id: str) -> dict | None:
        """The latest exclusion record of `contributor_id` (a forget was acknowledged
        for that id), or None if it was never forgotten."""
        row = self._conn().execute(
            "SELECT at, actor FROM audit WHERE action = 'exclude' AND contributor_id = ? "
            "ORDER BY id DESC LIMIT 1", (contributor_id,)).fetchone()
        return None if row is None else dict(row)

    def has_audit(self, action: str, job_id: str) -> bool:
        """Whether the job `job_id` already wrote its `action` record."""
        return self._conn().execute(
            "SELECT 1 FROM audit WHERE action = ? AND json_extract(details, '$.job_id') = ?",
            (action, job_id)).fetchone() is not None

    # ------------------------------------------------------------------ jobs
    def create_job(self, kind: str, actor: str, params: dict,
                   db: sqlite3.Connection | None = None) -> str:
        if db is None:
            with self.transaction() as db:
                return self.create_job(kind, actor, params, db)
        job_id = uuid.uuid4().hex
        db.execute("INSERT INTO jobs (job_id, kind, actor, params, status, created_at) "
                   "VALUES (?, ?, ?, ?, 'queued', ?)",
                   (job_id, kind, actor, json.dumps(params), time.time()))
        return job_id

    def update_job(self, job_id: str, status: str, result: dict | None = None,
                   error: str | None = None, db: sqlite3.Connection | None = None) -> None:
        if db is None:
            with self.transaction() as db:
                return self.update_job(job_id, status, result, error, db)
        finished = time.time() if status in ("succeeded", "failed") else None
        db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? "
                   "WHERE job_id = ?",
                   (status, json.dumps(result) if result is not None else None, error,
                    finished, job_id))

    def set_job_plan(self, job_id: str, plan: dict) -> None:
        """What a job is about to do, written before it does it (crash recovery)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET plan = ? WHERE job_id = ?", (json.dumps(plan), job_id))

    def claim_job(self, job_id: str) -> bool:
        """queued -> running; False if another runner took it first."""
        with self.transaction() as db:
            return db.execute("UPDATE jobs SET status = 'running' WHERE job_id = ? AND "
                              "status = 'queued'", (job_id,)).rowcount == 1

    @staticmethod
    def _job(row: sqlite3.Row) -> dict:
        job = dict(row)
        job["params"] = json.loads(job["params"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        job["plan"] = json.loads(job["plan"]) if job.get("plan") else None
        return job

    def get_job(self, job_id: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def jobs(self, statuses: tuple[str, ...] | None = None,
             kind: str | tuple[str, ...] | None = None, limit: int | None = None,
             newest_first: bool = False, finished_after: float | None = None) -> list[dict]:
        """Jobs in creation order (or newest first), optionally only those with the
        given statuses or kind(s), or finished after a time, at most `limit`: one query."""
        clauses, args = [], []
        if finished_after is not None:
            clauses.append("finished_at > ?")
            args.append(finished_after)
        if statuses:
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += list(statuses)
        if kind is not None:
            kinds = (kind,) if isinstance(kind, str) else tuple(kind)
            clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args += list(kinds)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        sql += " ORDER BY created_at" + (" DESC" if newest_first else "")
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return [self._job(r) for r in self._conn().execute(sql, args).fetchall()]

    # ------------------------------------------------------- admission, spend
    def admit(self, key_id: str, cost: int, per_minute: int | None, worker: str, seq: int,
              generation: int, requests_per_minute: int | None = None
              ) -> tuple[float, str] | None:
        """Charge `cost` to `key_id` and register request `seq` of `worker` as in
        flight at store `generation`, in one transaction. Returns None, or (seconds to
        wait, "cost" or "requests") when the key's spend over the last minute plus
        `cost` would pass `per_minute`, or its requests would pass
        `requests_per_minute` (nothing is charged then)."""
        now = time.time()
        with self.transaction() as db:
            if per_minute is not None or requests_per_minute is not None:
                rows = db.execute("SELECT at, cost FROM spend WHERE key_id = ? AND at > ? "
                                  "ORDER BY at", (key_id, now - 60)).fetchall()
                # refunds are rows of negative cost: they give back spend, not requests
                sent = [r for r in rows if r["cost"] > 0]
                if requests_per_minute is not None and len(sent) + 1 > requests_per_minute:
                    oldest = sent[len(sent) - requests_per_minute]["at"]
                    return max(1.0, oldest + 60 - now), "requests"
                spent = sum(r["cost"] for r in rows)
                if per_minute is not None and spent + cost > per_minute:
                    # the earliest moment enough of the window's spend has expired
                    need, freed = spent + cost - per_minute, 0
                    for r in rows:
                        freed += r["cost"]
                        if freed >= need:
                            return max(1.0, r["at"] + 60 - now), "cost"
                    return 60.0, "cost"
                db.execute("DELETE FROM spend WHERE at <= ?", (now - 60,))
                db.execute("INSERT INTO spend VALUES (?, ?, ?)", (key_id, now, cost))
            self.heartbeat(worker, db)
            db.execute("INSERT INTO inflight VALUES (?, ?, ?, ?)", (worker, seq, generation, now))
        return None

    def refund(self, key_id: str, cost: int) -> None:
        """Give back `cost` of `key_id`'s spend in the current minute (work a client
        that left did not get)."""
        with self.transaction() as db:
            db.execute("INSERT INTO spend VALUES (?, ?, ?)", (key_id, time.time(), -cost))

    def release(self, worker: str, seq: int, db: sqlite3.Connection | None = None) -> None:
        """Request `seq` of `worker` is no longer in flight."""
        if db is None:
            with self.transaction() as db:
                return self.release(worker, seq, db)
        db.execute("DELETE FROM inflight WHERE worker = ? AND seq = ?", (worker, seq))

    def inflight_since(self, generation: int, started_after: float = 0.0) -> list[dict]:
        """Requests of any worker admitted at store generation <= `generation` and
        started after `started_after` (older rows belong to requests past any timeout)."""
        return [dict(r) for r in self._conn().execute(
            "SELECT * FROM inflight WHERE generation <= ? AND started_at > ?",
            (generation, started_after))]

    def heartbeat(self, worker: str, db: sqlite3.Connection | None = None) -> None:
        """`worker` (a random instance id) is alive now."""
        if db is None:
            with self.transaction() as db:
                return self.heartbeat(worker, db)
        now = time.time()
        db.execute("INSERT INTO workers VALUES (?, ?, ?) ON CONFLICT(worker) DO UPDATE SET "
                   "heartbeat_at = excluded.heartbeat_at", (worker, now, now))
        # workers silent for an hour with nothing in flight (a CLI that generated, then
        # exited) leave no row behind
        db.execute("DELETE FROM workers WHERE heartbeat_at < ? AND worker NOT IN "
                   "(SELECT worker FROM inflight)", (now - 3600,))

    def dead_workers(self, silent_since: float) -> list[str]:
        """Workers with requests in flight whose last heartbeat is older than
        `silent_since` (or who never beat)."""
        return [r["worker"] for r in self._conn().execute(
            "SELECT DISTINCT i.worker FROM inflight i LEFT JOIN workers w ON w.worker = i.worker "
            "WHERE w.heartbeat_at IS NULL OR w.heartbeat_at < ?", (silent_since,))]

    def drop_workers(self, workers: list[str]) -> None:
        """Forget workers known to be dead (or stopped), and their in-flight rows."""
        with self.transaction() as db:
            db.executemany("DELETE FROM inflight WHERE worker = ?", [(w,) for w in workers])
            db.executemany("DELETE FROM workers WHERE worker = ?", [(w,) for w in workers])

    # ------------------------------------------------------------ valuations
    def record_valuation(self, prop: str, method: str, values: dict,
                         kind: str = "primary", params: dict | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO valuations (at, property, method, values_json, kind, params) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (time.time(), prop, method, json.dumps(values), kind, _params(params)))

    def valuation(self, prop: str, method: str, params: dict | None = None) -> dict | None:
        """The newest recorded values of (`prop`, `method`) with exactly these
        parameters (None: a method without any), or None."""
        row = self._conn().execute(
            "SELECT * FROM valuations WHERE property = ? AND method = ? AND params IS ? "
            "ORDER BY id DESC LIMIT 1", (prop, method, _params(params))).fetchone()
        return None if row is None else {"property": prop, "method": method, "params": params,
                                         "at": row["at"], "values": json.loads(row["values_json"])}

    def valuations(self, limit: int = 200) -> list[dict]:
        """The newest `limit` recorded valuations, newest first."""
        rows = self._conn().execute("SELECT * FROM valuations ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
        return [{"at": r["at"], "property": r["property"], "method": r["method"],
                 "params": _unparams(r["params"]),
                 "kind": r["kind"] or "primary", "values": json.loads(r["values_json"])}
                for r in rows]

    def recorded_valuations(self) -> list[tuple[str, str, dict | None]]:
        """Every (property, method, parameters) with recorded values."""
        return [(r["property"], r["method"], _unparams(r["params"]))
                for r in self._conn().execute(
                    "SELECT DISTINCT property, method, params FROM valuations "
                    "ORDER BY property, method, params")]

    def set_payout_policy(self, actor: str, prop: str, method: str,
                          params: dict | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO payout_policy (at, actor, property, method, params) "
                       "VALUES (?, ?, ?, ?, ?)", (time.time(), actor, prop, method, _params(params)))

    def payout_policy(self) -> dict | None:
        row = self._conn().execute(
            "SELECT * FROM payout_policy ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else {
            "property": row["property"], "method": row["method"],
            "params": _unparams(row["params"]),
            "set_at": row["at"], "set_by": row["actor"]}

    def drop_valuations(self, contributor_id: str) -> int:
        """Delete the recorded valuations that have a value for `contributor_id`."""
        with self.transaction() as db:
            rows = db.execute("SELECT id, values_json FROM valuations").fetchall()
            ids = [r["id"] for r in rows if contributor_id in json.loads(r["values_json"])]
            db.executemany("DELETE FROM valuations WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def latest_valuations(self) -> dict[str, dict]:
        """{property: {"method", "at", "values"}} from the newest row per property."""
        rows = self._conn().execute(
            "SELECT * FROM valuations WHERE id IN (SELECT MAX(id) FROM valuations "
            "WHERE kind IS NULL OR kind = 'primary' GROUP BY property)")
        return {r["property"]: {"method": r["method"], "at": r["at"],
                                "values": json.loads(r["values_json"])} for r in rows}

