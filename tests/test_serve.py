"""One real `cdm serve` (BentoML) subprocess on loopback: generate, forget, credit,
and durability of an acknowledged request across a kill -9."""

import contextlib
import json
import shutil
import time
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import wait_for_job

from service import testing
from service.db import Database

pytestmark = pytest.mark.integration


def post(port, endpoint, key, body):
    status, out, _ = post_worker(port, endpoint, key, body)
    return status, out


def post_worker(port, endpoint, key, body):
    """(status, body, the pid of the worker that answered)."""
    return testing.post(f"http://127.0.0.1:{port}", endpoint, key, body)


@contextlib.contextmanager
def serving(full_store, tmp_path, workers=1):
    root = tmp_path / "store"
    shutil.copytree(full_store.root, root)
    keys = {"ann": testing.cli_key(root, "ann", "a,b"),
            "root": testing.cli_key(root, "root", "all", admin=True)}
    with testing.serving(root, tmp_path / "serve.log", workers=workers, timeout=120) as server:
        yield server.port, keys, root, server.proc


@pytest.fixture()
def server(full_store, tmp_path):
    with serving(full_store, tmp_path) as s:
        yield s


def test_real_server_generate_forget_credit_and_kill(server):
    port, keys, root, proc = server
    status, out = post(port, "generate", keys["ann"], {"n": 2, "steps": 2, "seed": 0})
    assert status == 200 and out["contributors"] == ["a", "b"], out
    status, out2 = post(port, "generate", keys["ann"], {"contributors": ["c"], "n": 1, "steps": 1})
    assert status == 403 and "not licensed for: c" in out2["error"]
    status, job = post(port, "forget", keys["root"], {"contributor_id": "b"})
    assert status == 200
    status, out3 = post(port, "generate", keys["ann"], {"n": 1, "steps": 1})
    assert status == 200 and out3["contributors"] == ["a"]
    done = wait_for_job(lambda: post(port, "job", keys["root"], {"job_id": job["job_id"]})[1])
    assert done["status"] == "succeeded", done
    status, credit = post(port, "credit", keys["ann"], {})
    assert status == 200 and credit["contributors"]["a"]["usage"]["samples"] == 3
    with pytest.raises(urllib.error.HTTPError, match="401"):  # /metrics needs an admin key
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {keys['root']}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    assert 'cdm_generated_samples_total{contributor="a"}' in text
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE cdm_")]
    assert families and len(families) == len(set(families)), families  # none printed twice
    # acknowledged with 200, then the whole server is killed at once
    status, last = post(port, "generate", keys["ann"], {"n": 1, "steps": 1, "seed": 3})
    assert status == 200
    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *workers]:
        p.kill()  # SIGKILL: no shutdown hook runs
    proc.wait(timeout=10)
    psutil.wait_procs(workers, timeout=10)
    row = Database(root / "service.db").get_request(last["request_id"])
    assert row is not None and json.loads(row["attribution"]) == last["attribution"]
    assert not (root / "shards" / "b").exists()


def test_two_workers_agree_on_a_forget_under_load(full_store, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with serving(full_store, tmp_path, workers=2) as (port, keys, root, proc):
        body = {"n": 1, "steps": 2}
        with ThreadPoolExecutor(8) as pool:  # warm both workers up
            warm = list(pool.map(lambda _: post_worker(port, "generate", keys["root"], body), range(16)))
        assert all(s == 200 for s, _, _ in warm), warm
        status, job, _ = post_worker(port, "forget", keys["root"], {"contributor_id": "b"})
        assert status == 200
        after = []
        # the kernel hands each connection to whichever worker accepts first, and one
        # worker may get all of them for a while (one clean-clone CI run saw 320 in a row
        # go to one worker; why was not established): send rounds, pausing between them,
        # until both have answered (every answer is checked below, however many rounds)
        deadline = time.monotonic() + 120
        while len({w for _, _, w in after}) < 2 and time.monotonic() < deadline:
            with ThreadPoolExecutor(8) as pool:
                after += pool.map(lambda _: post_worker(port, "generate", keys["root"], body),
                                  range(16))
            time.sleep(0.5)
        assert all(s == 200 for s, _, _ in after), after
        assert all("b" not in out["contributors"] for _, out, _ in after)
        served = {w for _, _, w in after}
        # both workers answered after the acknowledgement (else: the server's log says why)
        assert len(served) == 2, (served, (tmp_path / "serve.log").read_text()[-4000:])
        done = wait_for_job(lambda: post(port, "job", keys["root"], {"job_id": job["job_id"]})[1])
        assert done["status"] == "succeeded", done
        time.sleep(2)  # both job runners have looked at the queue since
        audit = [e["action"] for e in Database(root / "service.db").audit_log("b")]
        assert audit == ["exclude", "purge"]  # the purge ran once
        status, out, _ = post_worker(port, "generate", keys["root"], {"contributors": ["b"], "n": 1, "steps": 1})
        assert status == 404
    from shards import ShardStore

    store = ShardStore.open(root)
    assert store.contributor_ids == ["a", "c"] and store.pending_purges == []
    store.load_sampler("cpu")(None, n=1, steps=1)
