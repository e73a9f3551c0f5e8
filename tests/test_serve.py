"""One real `cdm serve` (BentoML) subprocess on loopback: generate, forget, credit,
and durability of an acknowledged request across a kill -9."""

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
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


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


@pytest.fixture()
def server(full_store, tmp_path):
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
    proc = subprocess.Popen([CDM, "serve", "--store", str(root), "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, proc)
        yield port, keys, root, proc
    finally:
        kill_tree(proc.pid)
        log.close()


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
    assert status == 200 and credit["contributors"]["a"]["samples"] == 3
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert 'cdm_generated_samples_total{contributor="a"}' in r.read().decode()
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
