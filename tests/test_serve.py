"""One real `cdm serve` (BentoML) subprocess on loopback: generate, forget, credit,
and durability of an acknowledged request across a kill -9."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import wait_for_job
from proctree import kill_tree

from service.db import Database

CDM = str(Path(sys.executable).with_name("cdm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, endpoint, key, body):
    status, out, _ = post_worker(port, endpoint, key, body)
    return status, out


def wait_ready(port, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cdm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("cdm serve did not become ready")


@contextlib.contextmanager
def serving(full_store, tmp_path, workers=1):
    root = tmp_path / "store"
    shutil.copytree(full_store.root, root)
    keys = {}
    for user, license, admin in [("ann", "a,b", False), ("root", "all", True)]:
        args = [CDM, "keys", "create", "--store", str(root), "--user", user, "--license", license]
        out = subprocess.run(args + (["--admin"] if admin else []), capture_output=True, text=True,
                             check=True)
        keys[user] = out.stdout.strip()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([CDM, "serve", "--store", str(root), "--port", str(port),
                             "--workers", str(workers)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, proc)
        yield port, keys, root, proc
    finally:
        kill_tree(proc.pid)
        log.close()


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


def post_worker(port, endpoint, key, body):
    """Like `post`, also returning the pid of the worker that answered."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers["x-cdm-worker"]
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers.get("x-cdm-worker")


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
