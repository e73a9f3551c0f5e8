"""Two hosts: two `cdm serve` processes with separate connections, locks and memory,
on one PostgreSQL database (CDM_DATABASE_URL) and one store folder (the volume every
host mounts). What one host acknowledges holds on the other from its next request:
forgets (under 16 concurrent clients; each host's local copies of the forgotten
shard go too), key revocations, adds; a host killed -9 in the
middle of a purge leaves it to the other to finish; a database that stops under a
host answers 503 and bills nothing; and no lock file is ever made: the store's
locks are advisory locks in the database."""

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import wait_for_job
from test_crash import traces

from service import testing
from service.db import Database
from shards import ShardStore
from shards.coordination import LOCK_FILES
from shards.settings import OFFLINE_ENV

pytestmark = pytest.mark.integration


@pytest.fixture()
def shared_store(full_store, pg_cluster, tmp_path, monkeypatch):
    """A store folder both hosts open and a fresh Postgres database; the admin key."""
    root = tmp_path / "store"
    shutil.copytree(full_store.root, root)
    for name in LOCK_FILES.values():  # made by the fixture's build: none may appear again
        (root / name).unlink(missing_ok=True)
    (root / "service.db").unlink(missing_ok=True)
    url = pg_cluster.database()
    monkeypatch.setenv("CDM_DATABASE_URL", url)  # the CLI, and the hosts through os.environ
    monkeypatch.setenv("CDM_DATA_ROOTS", str(tmp_path))
    yield root, url, testing.cli_key(root, "root", admin=True)
    pg_cluster.drop(url)


def cached(cache, contributor_id: str) -> list:
    """The local copies of a contributor's weights in a host's cache."""
    return [p for p in cache.glob(f"*/{contributor_id}/*")]


def generate(url, key, **body):
    status, out, _ = testing.post(url, "generate", key, {"n": 1, "steps": 2, **body})
    return status, out


def test_what_one_host_acknowledges_holds_on_the_other(shared_store, data_dir, tmp_path):
    root, url, admin = shared_store
    # 16 clients of one key send more than the default 600 requests a minute, which
    # both hosts would count together (refusing with 429); this test is about forgetting
    unlimited = {"CDM_KEY_REQUESTS_PER_MINUTE": "100000"}
    caches = {h: tmp_path / f"cache-{h}" for h in "ab"}  # each host's local copies
    with testing.serving(root, tmp_path / "a.log",
                         env={**unlimited, "CDM_LOCAL_CACHE": str(caches["a"])}) as a, \
            testing.serving(root, tmp_path / "b.log",
                            env={**unlimited, "CDM_LOCAL_CACHE": str(caches["b"])}) as b:
        assert all(generate(h.url, admin)[0] == 200 for h in (a, b))
        assert all(cached(caches[h], "b") for h in "ab")  # read from the volume once
        # a key revoked through host A is refused by host B at its next request
        user = testing.cli_key(root, "ann")
        assert generate(b.url, user)[0] == 200
        key_id = user.split("_")[1]
        assert testing.post(a.url, "revoke_key", admin, {"key_id": key_id})[0] == 200
        assert generate(b.url, user)[0] == 401

        # a forget acknowledged by host A, under 16 clients on both hosts: no request
        # that started after the acknowledgement uses b, on either host
        answers, stop = [], threading.Event()

        def client(i):
            host = (a, b)[i % 2]
            while not stop.is_set():
                started = time.time()
                status, out = generate(host.url, admin, seed=i)
                answers.append((started, status, out, host.port))

        with ThreadPoolExecutor(16) as pool:
            for i in range(16):
                pool.submit(client, i)
            time.sleep(3)
            status, job, _ = testing.post(a.url, "forget", admin, {"contributor_id": "b"})
            acknowledged = time.time()
            assert status == 200, job
            time.sleep(6)
            stop.set()
        after = [(s, out, port) for started, s, out, port in answers if started > acknowledged]
        assert all(s == 200 for s, _, _ in after), [(s, o) for s, o, _ in after if s != 200][:3]
        assert {port for _, _, port in after} == {a.port, b.port}
        assert all("b" not in out["contributors"] for _, out, _ in after)
        assert any("b" in out["contributors"] for started, s, out, _ in answers
                   if started < acknowledged - 1)  # b was served before: the test can fail
        done = wait_for_job(lambda: testing.post(b.url, "job", admin, {"job_id": job["job_id"]})[1])
        assert done["status"] == "succeeded", done
        assert generate(b.url, admin, contributors=["b"])[0] == 404
        # each host had copies of b's weights on its own disk; both dropped them
        assert all(any(caches[h].rglob("*.safetensors")) for h in "ab")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(cached(caches[h], "b") for h in "ab"):
            time.sleep(0.2)
        assert not any(cached(caches[h], "b") for h in "ab")

        # a contributor added through host B is served by host A
        shutil.copytree(data_dir / "contributors" / "c", tmp_path / "dora")
        status, added, _ = testing.post(b.url, "add_contributor", admin,
                                        {"folder": str(tmp_path / "dora")})
        assert status == 200, added
        done = wait_for_job(lambda: testing.post(a.url, "job", admin, {"job_id": added["job_id"]})[1])
        assert done["status"] == "succeeded", done
        status, out = generate(a.url, admin, contributors=["dora"])
        assert status == 200 and out["contributors"] == ["dora"]
    db = Database(url)
    assert [e["action"] for e in db.audit_log("b")] == ["exclude", "purge"]  # ran once
    assert not any((root / name).exists() for name in LOCK_FILES.values())
    assert not (root / "service.db").exists()  # every record is in Postgres
    assert traces(root, "b") == []


# host A: `cdm forget`'s steps (exclusion and acknowledgement, then the purge in the
# same process), under the purge lock from the start, so that host B's runner cannot
# take the job first; CDM_CRASH_AT kills it -9 in the middle of the purge
HOST_A = """
import sys
from service.auth import Principal
from service.platform import Platform
platform = Platform(sys.argv[1], device="cpu", serve=False)
with platform.store.admin_lock():
    platform.forget(Principal("cli:ops", "admin", None), "b")
    print("acknowledged", flush=True)
    platform.run_jobs("purge")
"""


@pytest.mark.parametrize("point", ["purge:files-deleted"])  # every point: test_crash.py
def test_a_host_killed_mid_purge_leaves_it_to_the_other(point, shared_store, tmp_path):
    """Host A acknowledges a forget and is killed -9 at `point` of the purge, holding
    the purge lock; host B's job runner, already serving, takes the lock when A's
    connections drop and finishes the purge from A's recorded plan."""
    root, url, admin = shared_store
    with testing.serving(root, tmp_path / "b.log") as b:
        assert generate(b.url, admin)[1]["contributors"] == ["a", "b", "c"]
        env = {**os.environ, **OFFLINE_ENV, "CDM_CRASH_AT": point}
        host_a = subprocess.run([sys.executable, "-c", HOST_A, str(root)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert host_a.returncode == -9, host_a.stderr[-2000:]  # killed at the point
        assert host_a.stdout.strip() == "acknowledged"
        assert generate(b.url, admin)[1]["contributors"] == ["a", "c"]
        db = Database(url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
                [j["status"] for j in db.jobs(kind="purge")] != ["succeeded"]
                or ShardStore.open(root).pending_purges):
            time.sleep(0.3)
        log = (tmp_path / "b.log").read_text(errors="replace")[-3000:]
        assert [j["status"] for j in db.jobs(kind="purge")] == ["succeeded"], log
        assert [e["action"] for e in db.audit_log("b")] == ["exclude", "purge"]
        assert generate(b.url, admin)[1]["contributors"] == ["a", "c"]
    store = ShardStore.open(root)
    assert store.contributor_ids == ["a", "c"] and store.pending_purges == []
    assert traces(root, "b") == []


def test_a_host_whose_database_goes_away_answers_503_and_bills_nothing(full_store, tmp_path,
                                                                        monkeypatch):
    """The database stops under a serving host: requests answer 503 with Retry-After
    (no traceback, no password in the message) and are not billed; once it is back,
    the next request is served."""
    import json
    import urllib.error
    import urllib.request

    from service.testing import PostgresCluster

    cluster = PostgresCluster()  # its own server: this test stops it
    try:
        url = cluster.database()
        monkeypatch.setenv("CDM_DATABASE_URL", url)
        root = tmp_path / "store"
        shutil.copytree(full_store.root, root)
        admin = testing.cli_key(root, "root", admin=True)
        with testing.serving(root, tmp_path / "a.log") as a:
            assert generate(a.url, admin)[0] == 200
            cluster.stop()
            req = urllib.request.Request(f"{a.url}/generate", data=b'{"n": 1, "steps": 2}',
                                         headers={"Authorization": f"Bearer {admin}",
                                                  "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(req, timeout=60)
            assert answer.value.code == 503 and int(answer.value.headers["Retry-After"]) > 0
            error = json.loads(answer.value.read())["error"]
            assert "unavailable" in error and "cdm-test-password" not in error, error
            cluster.start()  # back: the next request is served (stale connections replaced)
            assert generate(a.url, admin)[0] == 200
        db = Database(url)
        assert len(db.history()) == 2  # the request answered 503 left no ledger row
        assert db.spent() == 2 * db.history()[0]["params"]["n"] * 2 * 3  # n x steps x shards
    finally:
        cluster.close()
