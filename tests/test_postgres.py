"""The records on PostgreSQL (CDM_DATABASE_URL) as on SQLite: one schema through
Alembic's migrations, databases of before migrations upgraded in place, one key's
limit held across hosts, and a database that is wrong or goes away answered by one
clear error (503, nothing billed), never a traceback."""

import os
import sqlite3
import subprocess
import sys
import threading

import pytest
import sqlalchemy as sa

from service.auth import Principal, create_key
from service.db import Database
from service.errors import DatabaseUnavailable, status_for
from service.sql import MIGRATIONS, REVISION
from service.testing import PostgresCluster
from shards.errors import StoreUnavailableError

# the first release's tables, before any column was added (a store's service.db then)
LEGACY = """
CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE keys (key_id TEXT PRIMARY KEY, user TEXT NOT NULL, role TEXT NOT NULL,
    license TEXT NOT NULL, salt BLOB NOT NULL, key_hash BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE requests (request_id TEXT PRIMARY KEY, user TEXT NOT NULL, created_at REAL NOT NULL,
    params TEXT NOT NULL, contributors TEXT NOT NULL, attribution TEXT NOT NULL);
CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, contributor_id TEXT NOT NULL, details TEXT NOT NULL);
CREATE TABLE jobs (job_id TEXT PRIMARY KEY, kind TEXT NOT NULL, actor TEXT NOT NULL,
    params TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL,
    result TEXT, error TEXT);
INSERT INTO audit (at, actor, action, contributor_id, details)
    VALUES (1.0, 'root', 'exclude', 'old', '{"job_id": "j0"}');
"""


def columns(db: Database) -> dict[str, set[str]]:
    inspector = sa.inspect(db.engine)
    return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()}


def test_the_code_expects_the_newest_migration():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == REVISION


def test_a_database_of_before_migrations_is_upgraded_in_place(tmp_path, pg_cluster):
    path = tmp_path / "service.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY)
    old = Database(path)
    assert old.revision() == REVISION
    assert old.forgotten("old")["actor"] == "root"  # kept
    assert old.has_audit("exclude", "j0")
    key = create_key(old, "ann", None, role="contributor", contributor_id="a")  # a column added by the upgrade
    assert old.list_keys()[0]["contributor_id"] == "a" and key
    # the same tables and columns as a database made new, on either engine
    fresh = Database(tmp_path / "fresh.db")
    postgres = Database(pg_cluster.database())
    assert columns(old) == columns(fresh) == columns(postgres)
    assert "alembic_version" in columns(postgres) and postgres.revision() == REVISION
    Database(path)  # opening again migrates nothing
    assert len(old.audit_log()) == 1
    assert "requests_by_user" in {i["name"] for i in sa.inspect(old.engine).get_indexes("requests")}
    # a database that newer code migrated: one line, not Alembic's traceback
    with old.transaction() as db:
        db.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(DatabaseUnavailable, match="revision '0099'.*upgrade cdm-serve"):
        Database(path)


def test_two_hosts_never_both_pass_one_keys_limit(tmp_path, backend):
    """Two handles (two hosts) admit one key at once: exactly its limit passes."""
    where = backend or tmp_path / "service.db"
    hosts = [Database(where), Database(where)]
    passed, errors = [], []

    def admit(i):
        try:
            if hosts[i % 2].admit("k", 1, 10, f"w{i % 2}", i, 0) is None:
                passed.append(i)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(passed) == 10 and hosts[0].spent("k") == 10
    assert len(hosts[1].inflight_since(0)) == 10


def test_a_wrong_database_is_one_clear_error(store_copy, pg_cluster):
    with pytest.raises(ValueError, match="'mysql' databases are not supported"):
        Database("mysql://u:p@localhost/db")
    with pytest.raises(DatabaseUnavailable, match="password authentication failed") as err:
        Database(pg_cluster.url("postgres", password="not-the-password"))
    assert "not-the-password" not in str(err.value) and "***" in str(err.value)
    with pytest.raises(DatabaseUnavailable, match="unavailable"):
        Database(pg_cluster.url("no_such_database"))
    # the command: one line, no traceback (cdm serve checks before it starts bentoml;
    # every command goes through the same open and the same error)
    for command in (["serve"],):
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", *command, "--store", str(store_copy.root)],
            capture_output=True, text=True, timeout=120,
            env={"CDM_DATABASE_URL": pg_cluster.url("postgres", password="nope"), "PATH": ""})
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert out.stderr.count("\n") == 1 and "password authentication failed" in out.stderr


def test_the_database_going_away_mid_service_is_503_and_bills_nothing(store_copy, monkeypatch):
    from service.platform import Platform

    cluster = PostgresCluster()  # its own server: this test stops it
    try:
        monkeypatch.setenv("CDM_DATABASE_URL", cluster.database())
        platform = Platform(store_copy.root, device="cpu", serve=False)
        user = platform.verify(f"Bearer {create_key(platform.db, 'u', None)}")
        platform.generate(user, n=1, steps=2, seed=1)
        billed = platform.db.spent()
        held = [platform.db.engine.connect() for _ in range(4)]  # the pool keeps 4 open
        for conn in held:
            conn.close()
        cluster.stop()
        with pytest.raises(DatabaseUnavailable) as err:
            platform.generate(user, n=1, steps=2, seed=1)
        assert status_for(err.value) == 503 and err.value.retry_after > 0
        with pytest.raises(StoreUnavailableError) as err:  # the store's locks: 503 too
            platform.forget(Principal("root", "admin", None), "b")
        assert status_for(err.value) == 503 and "unavailable" in str(err.value)
        assert platform.store.contributor_ids == ["a", "b", "c"]  # nothing done
        cluster.start()  # back: every stale pooled connection is replaced, none answers 503
        for _ in range(8):
            platform.db.spent()
        platform.generate(user, n=1, steps=2, seed=2)
        assert platform.db.spent() == 2 * billed  # the refused request was not billed
        assert len(platform.db.history()) == 2
        platform.close()
    finally:
        cluster.close()


HOLDER = """
import sys, time
from shards import ShardStore
store = ShardStore.open(sys.argv[1])
with store.write_lock():
    print(store.locks.kind, flush=True)
    time.sleep(600)
"""


def test_store_locks_are_advisory_locks_that_die_with_their_host(store_copy, pg_cluster,
                                                                 monkeypatch):
    """With the database on Postgres, a store's locks are advisory locks: exclusive
    between processes and threads, reentrant within a thread, released when the
    holding process is killed -9, and no lock file is made."""
    from shards import ShardStore

    url = pg_cluster.database()
    monkeypatch.setenv("CDM_DATABASE_URL", url)
    root = store_copy.root
    for name in (".lock", ".admin.lock", ".work.lock"):
        (root / name).unlink(missing_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert holder.stdout.readline().strip() == "postgres"
        store = ShardStore.open(root)
        got = threading.Event()

        def take():
            with store.write_lock(), store.write_lock():  # reentrant
                got.set()

        waiter = threading.Thread(target=take)
        waiter.start()
        assert not got.wait(1.5)  # the other process holds it
        with store.work_lock():  # another lock: free
            pass
        holder.kill()  # -9: no release but the connection's end
        assert got.wait(10)
        waiter.join()
    finally:
        holder.kill()
        holder.wait()
    # two threads of one process exclude each other
    inside, release = threading.Event(), threading.Event()

    def hold():
        with store.admin_lock():
            inside.set()
            release.wait(30)

    first = threading.Thread(target=hold)
    first.start()
    assert inside.wait(10)
    taken = threading.Event()

    def take_admin():
        with store.admin_lock():
            taken.set()

    second = threading.Thread(target=take_admin)
    second.start()
    assert not taken.wait(1.0)  # waits for the first thread
    release.set()
    first.join()
    assert taken.wait(10)
    second.join()
    # a lock whose connection dropped is no longer held: nothing is committed under it
    import psycopg

    generation = store.generation
    with store.write_lock():
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks "
                          "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()")
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            store.exclude("b")
    assert ShardStore.open(root).generation == generation and "b" in store.contributor_ids
    assert not any((root / name).exists() for name in (".lock", ".admin.lock", ".work.lock"))


def test_every_manifest_commit_is_announced(store_copy, pg_cluster, monkeypatch):
    import psycopg

    from shards import ShardStore
    from shards.coordination import CHANNEL

    url = pg_cluster.database()
    monkeypatch.setenv("CDM_DATABASE_URL", url)
    store = ShardStore.open(store_copy.root)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        store.exclude("b")
        notes = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.payload.rsplit(" ", 1)[1] for n in notes] == [str(store.generation)]


def test_a_purge_that_loses_the_database_is_resumed_not_failed(store_copy, backend):
    """A purge interrupted because the database or the volume went away stays
    running, and the next pass of the runner finishes it from its plan (a failed
    purge would wait ten minutes for a retry)."""
    from service.platform import Platform

    platform = Platform(store_copy.root, device="cpu", serve=False)
    purge, calls = platform.jobs.handlers["purge"], []

    def flaky(job):
        calls.append(job["job_id"])
        if len(calls) == 1:
            raise StoreUnavailableError("the store's write lock: database unavailable: test")
        return purge(job)

    platform.jobs.handlers["purge"] = flaky
    job = platform.forget(Principal("root", "admin", None), "b")
    platform.run_jobs("purge")
    assert platform.db.get_job(job["job_id"])["status"] == "running"
    platform.run_jobs("purge")
    assert platform.db.get_job(job["job_id"])["status"] == "succeeded"
    assert calls == [job["job_id"]] * 2
    assert [e["action"] for e in platform.db.audit_log("b")] == ["exclude", "purge"]
    platform.close()
