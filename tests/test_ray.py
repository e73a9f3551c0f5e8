"""Valuation on Ray: a Ray started in this process, then a cluster of a head node and
a worker node started by the test (two `ray start` processes on this machine). The
exact Shapley values by composition equal the in-process run's bit for bit, and a
run that loses its worker node midway still completes with the same values (its
actor restarted on the head, its coalitions sent again)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from golden import one_thread

from valuation.parallel import Backend
from valuation.properties import build_evaluator
from valuation.run import ValuationSettings, run_valuation
from valuation.utility import CompositionUtility, store_cache

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).parent / "ray")
# a dead node is noticed after 2 missed health checks a second apart (default 5 x 3 s);
# a loopback test cluster without Ray's token authentication, which would otherwise
# follow whatever ~/.ray/auth_token this machine has
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2"}
ENV = {**os.environ, **RAY_TEST_ENV}
VALUE = dict(n=16, steps=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


@pytest.fixture(scope="module")
def cluster():
    """A head node (2 CPUs) and a worker node (1 CPU, its own process group, so the
    last test can kill it), and this process connected as the driver."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in RAY_TEST_ENV}
    os.environ.update(RAY_TEST_ENV)  # the driver (this process) as the nodes
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, env=ENV, timeout=180, capture_output=True)
    worker = subprocess.Popen([RAY, "start", f"--address={address}", "--num-cpus=1", "--block"],
                              env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        if ray.is_initialized():  # a local Ray of an earlier test in this process
            ray.shutdown()
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        deadline = time.time() + 120
        while _alive_nodes() < 2:
            assert time.time() < deadline, "the worker node did not join the cluster"
            time.sleep(0.5)
        yield address, worker
    finally:
        ray.shutdown()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env=ENV, timeout=120, capture_output=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_ray_started_in_this_process_gives_the_same_values(joint_copy, heldout, monkeypatch):
    """`ray_address="local"`: a Ray of this process's own (before the cluster's tests,
    in this file so that no other test process's `ray stop` can meet it)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    build_evaluator(joint_copy.root, heldout)
    one, _ = run_valuation(joint_copy.root, ValuationSettings(methods=("exact",), **VALUE),
                           progress=False)
    store_cache(joint_copy).root.rename(joint_copy.root / "old-cache")
    try:
        two, res = run_valuation(joint_copy.root, ValuationSettings(
            methods=("exact",), workers=2, ray_address="local", **VALUE), progress=False)
    finally:
        ray.shutdown()
    assert res["exact"].extra["computed"] == 2 ** len(joint_copy.contributor_ids)
    assert two["methods"]["exact"]["values"] == pytest.approx(one["methods"]["exact"]["values"],
                                                              rel=1e-6)


def _in_process(source_kwargs, coalitions) -> list[float]:
    """U(S) computed here with one thread, as each actor computes it."""
    with one_thread():
        source = CompositionUtility(**source_kwargs)
        return [source.evaluate(c) for c in coalitions]


def test_exact_shapley_on_a_ray_cluster_equals_in_process(joint_copy, heldout, cluster):
    address, _ = cluster
    build_evaluator(joint_copy.root, heldout)
    with one_thread():  # as the actors: the same float reductions
        here, _ = run_valuation(joint_copy.root, ValuationSettings(methods=("exact",), **VALUE),
                                progress=False)
    store_cache(joint_copy).root.rename(joint_copy.root / "old-cache")
    there, results = run_valuation(joint_copy.root, ValuationSettings(
        methods=("exact",), workers=2, ray_address=address, **VALUE), progress=False)
    assert results["exact"].extra["computed"] == 2 ** len(joint_copy.contributor_ids)
    assert there["methods"]["exact"]["values"] == here["methods"]["exact"]["values"]


def test_the_services_valuation_jobs_run_on_the_configured_cluster(joint_copy, heldout, cluster,
                                                                   monkeypatch):
    from service.auth import create_key
    from service.platform import Platform

    address, _ = cluster
    build_evaluator(joint_copy.root, heldout)
    monkeypatch.setenv("CDM_RAY_ADDRESS", address)
    platform = Platform(joint_copy.root, device="cpu", serve=False)
    try:
        admin = platform.verify(f"Bearer {create_key(platform.db, 'root', None, role='admin')}")
        job = platform.value(admin, methods=["exact"], n=16, steps=3)
        platform.run_jobs()
        done = platform.db.get_job(job["job_id"])
        assert done["status"] == "succeeded", done["error"]
        values = done["result"]["methods"]["exact"]["values"]
    finally:
        platform.close()
    players = joint_copy.contributor_ids
    assert len(values) == len(players)
    # the actors of the job's run ran on the cluster's two nodes: the same values as here
    store_cache(joint_copy).root.rename(joint_copy.root / "old-cache")
    with one_thread():
        here, _ = run_valuation(joint_copy.root, ValuationSettings(methods=("exact",), **VALUE),
                                progress=False)
    assert here["methods"]["exact"]["values"] == values


def test_a_run_that_loses_its_worker_node_completes(joint_copy, heldout, cluster):
    address, worker = cluster
    build_evaluator(joint_copy.root, heldout)
    kwargs = {"store_root": str(joint_copy.root), "property": "quality", "n": 64, "steps": 6}
    players = joint_copy.contributor_ids
    coalitions = [frozenset(players[:k]) for k in range(1, len(players) + 1)] * 3
    backend = Backend(None, workers=2, spec=(CompositionUtility, kwargs), ray_address=address)
    try:
        got = []
        for value, _ in backend.run(coalitions):
            got.append(value)
            if len(got) == 1:  # the other actor is still at work: kill the worker node
                nodes = {ray.get(a.node.remote()) for a in backend._pool}
                assert len(nodes) == 2  # one actor on each node
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        deadline = time.time() + 60
        while _alive_nodes() > 1:  # the kill took the whole node down
            assert time.time() < deadline, "the killed worker node is still alive"
            time.sleep(0.5)
        # the actor of the dead node was restarted on the head, and both are there
        assert sorted(ray.get([a.restarted.remote() for a in backend._pool])) == [False, True]
        assert len({ray.get(a.node.remote()) for a in backend._pool}) == 1
    finally:
        backend.close()
    assert got == _in_process(kwargs, coalitions)
