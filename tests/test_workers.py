"""Several workers and processes on one store: an exclusion acknowledged by one is
honoured by the others for every request that starts after it, jobs run once, and
concurrent writers never lose each other's changes."""

import os
import subprocess
import sys
import time

import pytest
from conftest import wait_for_job

from service.auth import create_key
from service.context import separate
from service.platform import Platform
from shards import ShardStore
from shards.errors import UnknownContributorError

# on the SQLite file in the store and on a Postgres database (advisory locks)
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]


@pytest.fixture()
def two_workers(store_copy):
    """Two workers in this process, each with a database handle and key verifier of
    its own, as two worker processes have."""
    workers = [Platform(store_copy.root, device="cpu", parts=separate(store_copy.root))
               for _ in range(2)]
    yield workers
    for w in workers:
        w.close()


def test_forget_through_one_worker_holds_in_the_other(two_workers, data_dir):
    one, two = two_workers
    key = create_key(one.db, "root", None, role="admin")
    admin_one, admin_two = one.verify(f"Bearer {key}"), two.verify(f"Bearer {key}")
    assert two.generate(admin_two, n=1, steps=1)["contributors"] == ["a", "b", "c"]
    job = one.forget(admin_one, "b")
    # acknowledged by worker one: worker two's very next request does not use b
    assert two.generate(admin_two, n=2, steps=2)["contributors"] == ["a", "c"]
    with pytest.raises(UnknownContributorError):
        two.generate(admin_two, contributors=["b"], n=1, steps=1)
    try:  # worker two asked to forget it again: the same purge, or gone already
        again = two.forget(admin_two, "b")
        assert again["job_id"] == job["job_id"] and again["in_progress"] is True
    except UnknownContributorError:
        pass
    done = wait_for_job(lambda: two.job(admin_two, job["job_id"]))
    assert done["status"] == "succeeded", done
    time.sleep(1.5)  # both runners have woken at least once since
    assert [e["action"] for e in one.db.audit_log("b")] == ["exclude", "purge"]  # ran once
    assert not (one.store.root / "shards" / "b").exists()
    # an add through worker two is served by worker one
    import shutil

    shutil.copytree(data_dir / "contributors" / "c", one.store.root.parent / "dora")
    added = two.add_contributor(admin_two, str(one.store.root.parent / "dora"))
    assert wait_for_job(lambda: one.job(admin_one, added["job_id"]))["status"] == "succeeded"
    assert one.generate(admin_one, contributors=["dora"], n=1, steps=1)["contributors"] == ["dora"]
    assert ShardStore.open(one.store.root).contributor_ids == ["a", "c", "dora"]


WRITER = """
import sys, time
from shards import ShardStore
from shards.data import load_contributor
root, action, cid, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
store = ShardStore.open(root)  # opened before the others write: a stale copy
while time.time() < start:
    time.sleep(0.005)
if action == "forget":
    store.exclude(cid)
    store.purge(cid)
elif action == "exclude":
    store.exclude(cid)
else:
    store.add(load_contributor(cid), progress=False, device="cpu")
"""


def test_processes_writing_the_store_at_once_lose_nothing(store_copy, data_dir, tmp_path):
    import shutil

    root = store_copy.root
    shutil.copytree(data_dir / "contributors" / "c", tmp_path / "dora")
    before = store_copy.generation
    start = time.time() + 8  # past every process's imports
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), action, cid, str(start)],
                              env=env, stderr=subprocess.PIPE, text=True)
             for action, cid in [("forget", "a"), ("exclude", "b"), ("add", str(tmp_path / "dora"))]]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    store = ShardStore.open(root)
    assert store.contributor_ids == ["c", "dora"]
    assert store.pending_purges == ["b"]
    assert store.generation == before + 4  # exclude a, purge a, exclude b, add dora
    assert not (root / "shards" / "a").exists() and (root / "shards" / "b").exists()
    store.load_sampler("cpu")(None, n=1, steps=1)


def test_an_idle_worker_drops_a_forgotten_contributors_weights(two_workers):
    """Worker two served c, then only answered reads (which refresh the store) while
    worker one forgot c: its job runner's next pass drops every weight of c, without a
    generate request to make it reload. (Worker two's runner thread is stopped and its
    pass run here, so that the reads surely come before it.)"""
    one, two = two_workers
    key = create_key(one.db, "root", None, role="admin")
    admin_one, admin_two = one.verify(f"Bearer {key}"), two.verify(f"Bearer {key}")
    two.generate(admin_two, contributors=["c"], n=1, steps=2)
    assert "c" in two.live.sampler.bank.slots  # c's weights are resident in worker two
    two._closed.set()  # stop worker two's runner threads; its sampler keeps serving
    for wake in two._wakes.values():
        wake.set()
    for runner in two._runners:
        runner.join(timeout=30)
    job = one.forget(admin_one, "c")
    assert wait_for_job(lambda: one.job(admin_one, job["job_id"]))["status"] == "succeeded"
    assert two.contributors() and two.credit(admin_two)  # reads: each refreshes the store
    two.run_jobs()  # the runner's pass
    assert two.live.sampler.bank.contributor_ids == ["a", "b"]
    assert "c" not in two.live.sampler.bank.slots


def test_a_forgotten_id_is_not_admitted_again(two_workers, data_dir):
    """A new contributor under a forgotten one's id would inherit its licences, credit,
    history and audit: the id is refused, with a clear error, in every worker."""
    import shutil

    from shards.errors import StoreError

    one, two = two_workers
    key = create_key(one.db, "root", None, role="admin")
    admin_one, admin_two = one.verify(f"Bearer {key}"), two.verify(f"Bearer {key}")
    job = one.forget(admin_one, "c")
    folder = one.store.root.parent / "c"
    shutil.copytree(data_dir / "contributors" / "a", folder)  # someone else's data, id c
    with pytest.raises(StoreError, match="ids are not reused"):  # while the purge runs
        two.add_contributor(admin_two, str(folder))
    assert wait_for_job(lambda: one.job(admin_one, job["job_id"]))["status"] == "succeeded"
    for worker, admin in ((one, admin_one), (two, admin_two)):
        with pytest.raises(StoreError, match="belonged to a contributor who was forgotten"):
            worker.add_contributor(admin, str(folder))
    assert not [j for j in one.db.jobs() if j["kind"] == "add"]  # nothing was queued
