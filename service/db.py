"""SQLite state of the service: API keys (hashed), the credit ledger, the forgetting
audit log and background jobs. WAL journal with synchronous=FULL: a transaction that
returned is on disk, so a request acknowledged with 200 survives a kill right after.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL,
    license TEXT NOT NULL, salt BLOB NOT NULL, key_hash BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, user TEXT NOT NULL, created_at REAL NOT NULL,
    params TEXT NOT NULL, contributors TEXT NOT NULL, attribution TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credit (
    request_id TEXT NOT NULL REFERENCES requests(request_id), contributor_id TEXT NOT NULL,
    samples INTEGER NOT NULL, mass REAL NOT NULL, PRIMARY KEY (request_id, contributor_id));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, contributor_id TEXT NOT NULL, details TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, actor TEXT NOT NULL, params TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL, result TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS valuations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, property TEXT NOT NULL,
    method TEXT NOT NULL, values_json TEXT NOT NULL);
"""


class Database:
    """One SQLite file; a connection per thread (sqlite3 objects are thread-bound)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def _tx(self):
        db = self._conn()

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")
                return db

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    # ------------------------------------------------------------------ keys
    def insert_key(self, key_id: str, user: str, role: str, license: list[str] | None,
                   salt: bytes, key_hash: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (key_id, user, role, json.dumps(license), salt, key_hash, time.time()))

    def get_key(self, key_id: str) -> sqlite3.Row | None:
        return self._conn().execute("SELECT * FROM keys WHERE key_id = ?", (key_id,)).fetchone()

    # ---------------------------------------------------------------- ledger
    def record_request(self, user: str, params: dict, contributors: list[str],
                       attribution: dict[str, list[float]]) -> str:
        """One row per generate request, and its per-contributor credit, in one
        transaction. Returns the request id."""
        request_id = uuid.uuid4().hex
        with self._tx() as db:
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

    def credit_totals(self) -> dict[str, dict[str, float]]:
        rows = self._conn().execute(
            "SELECT contributor_id, SUM(samples) AS samples, SUM(mass) AS mass "
            "FROM credit GROUP BY contributor_id").fetchall()
        return {r["contributor_id"]: {"samples": int(r["samples"]), "mass": float(r["mass"])}
                for r in rows}

    # ----------------------------------------------------------------- audit
    def audit(self, actor: str, action: str, contributor_id: str, details: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO audit (at, actor, action, contributor_id, details) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (time.time(), actor, action, contributor_id, json.dumps(details)))

    def audit_log(self, contributor_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM audit", ()
        if contributor_id:
            sql, args = sql + " WHERE contributor_id = ?", (contributor_id,)
        return [{**dict(r), "details": json.loads(r["details"])}
                for r in self._conn().execute(sql + " ORDER BY id", args)]

    # ------------------------------------------------------------------ jobs
    def create_job(self, kind: str, actor: str, params: dict) -> str:
        job_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute("INSERT INTO jobs (job_id, kind, actor, params, status, created_at) "
                       "VALUES (?, ?, ?, ?, 'queued', ?)",
                       (job_id, kind, actor, json.dumps(params), time.time()))
        return job_id

    def update_job(self, job_id: str, status: str, result: dict | None = None,
                   error: str | None = None) -> None:
        finished = time.time() if status in ("succeeded", "failed") else None
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ? "
                       "WHERE job_id = ?",
                       (status, json.dumps(result) if result is not None else None, error,
                        finished, job_id))

    def get_job(self, job_id: str) -> dict | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["params"] = json.loads(job["params"])
        job["result"] = json.loads(job["result"]) if job["result"] else None
        return job

    def jobs(self, statuses: tuple[str, ...] | None = None) -> list[dict]:
        """Jobs in creation order, optionally only those with the given statuses."""
        sql, args = "SELECT job_id FROM jobs", ()
        if statuses:
            sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = statuses
        rows = self._conn().execute(sql + " ORDER BY created_at", args).fetchall()
        return [self.get_job(r["job_id"]) for r in rows]

    def interrupted_jobs(self) -> list[dict]:
        return self.jobs(("queued", "running"))

    # ------------------------------------------------------------ valuations
    def record_valuation(self, prop: str, method: str, values: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO valuations (at, property, method, values_json) VALUES (?, ?, ?, ?)",
                       (time.time(), prop, method, json.dumps(values)))

    def drop_valuations(self, contributor_id: str) -> int:
        """Delete the recorded valuations that have a value for `contributor_id`."""
        rows = self._conn().execute("SELECT id, values_json FROM valuations").fetchall()
        ids = [r["id"] for r in rows if contributor_id in json.loads(r["values_json"])]
        with self._tx() as db:
            db.executemany("DELETE FROM valuations WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def latest_valuations(self) -> dict[str, dict]:
        """{property: {"method", "at", "values"}} from the newest row per property."""
        rows = self._conn().execute(
            "SELECT * FROM valuations WHERE id IN (SELECT MAX(id) FROM valuations GROUP BY property)")
        return {r["property"]: {"method": r["method"], "at": r["at"],
                                "values": json.loads(r["values_json"])} for r in rows}
