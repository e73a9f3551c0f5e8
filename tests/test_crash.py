"""kill -9 at every step boundary of forgetting and of adding a contributor: after
recovery (`cdm jobs --run`, what every worker does at start) the store loads, the
audit log holds the records, and nothing of a forgotten contributor is on disk."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.auth import Principal
from service.db import Database
from service.platform import Platform
from shards import ShardStore

pytestmark = pytest.mark.integration

CDM = str(Path(sys.executable).with_name("cdm"))
FORGET_POINTS = ["forget:excluded", "forget:acknowledged", "purge:planned",
                 "purge:caches-dropped", "purge:files-deleted", "purge:committed"]
ADD_POINTS = ["add:shard-written", "add:committed"]
ADMIN = Principal("root", "admin", None, "k")


def cdm(*args, crash_at=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("CDM_CRASH_AT", None)
    if crash_at:
        env["CDM_CRASH_AT"] = crash_at
    return subprocess.run([CDM, *args], capture_output=True, text=True, env=env, timeout=300)


def traces(root: Path, cid: str) -> list[str]:
    """Files or folders under the store named for `cid` (its shard, head, data, or a
    staging folder of any of them)."""
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name == cid or cid in p.name.split(".")]


@pytest.mark.parametrize("point", FORGET_POINTS)
def test_forget_survives_kill_at(point, store_copy):
    root = store_copy.root
    entry = store_copy.contributor("b")
    (root / "shards" / ".b.partial").mkdir()  # as an interrupted add of b would leave it
    killed = cdm("forget", "b", "--store", str(root), crash_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    recovered = cdm("jobs", "--run", "--store", str(root))
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    store = ShardStore.open(root)
    store.load_sampler("cpu")(None, n=1, steps=1)  # the store loads and samples
    db = Database(root / "service.db")
    actions = [e["action"] for e in db.audit_log("b")]
    assert actions == ["exclude", "purge"], actions
    if point == "forget:excluded":  # died before its job row: recovery made one
        assert db.audit_log("b")[0]["details"]["recovered"] is True
    assert "b" not in store.contributor_ids and store.pending_purges == []
    assert traces(root, "b") == []
    purge = db.audit_log("b")[1]["details"]
    assert purge["weights_hash"] == entry["weights_hash"] and purge["deleted"] == ["shards/b", "router/b"]
    assert all(j["status"] in ("succeeded", "failed") for j in db.jobs())


@pytest.mark.parametrize("point", ADD_POINTS)
def test_add_survives_kill_at(point, store_copy, data_dir):
    root = store_copy.root
    folder = root.parent / "dora"
    shutil.copytree(data_dir / "contributors" / "c", folder)
    platform = Platform(root, device="cpu", serve=False)
    job = platform.add_contributor(ADMIN, str(folder))
    killed = cdm("jobs", "--run", "--store", str(root), crash_at=point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    recovered = cdm("jobs", "--run", "--store", str(root))
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    store = ShardStore.open(root)
    db = Database(root / "service.db")
    done = db.get_job(job["job_id"])
    leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if "dora" in p.name]
    if point == "add:shard-written":  # before the manifest switch: nothing of it may stay
        assert done["status"] == "failed" and "partial files removed" in done["error"]
        assert "dora" not in store.contributor_ids and leftovers == []
        assert db.audit_log("dora") == []
    else:  # after the switch: the add stands, its missing record is written
        assert done["status"] == "succeeded", done
        assert "dora" in store.contributor_ids
        [record] = db.audit_log("dora")
        assert record["action"] == "add" and record["details"]["recovered"] is True
        out = store.load_sampler("cpu")(["dora"], n=1, steps=1)
        assert out.contributor_ids == ["dora"]


def test_joint_purge_survives_kill_after_the_classifier_switch(joint_copy):
    """Router joint: a crash between the retrained classifier's switch and the old
    version's deletion must not leave the old one (it saw the forgotten data)."""
    root = joint_copy.root
    old = joint_copy.manifest["classifier"]["path"]
    killed = cdm("forget", "b", "--store", str(root), crash_at="classifier:switched")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (root / old).exists()  # the crash left it
    recovered = cdm("jobs", "--run", "--store", str(root))
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    store = ShardStore.open(root)
    assert not (root / old).exists()
    assert sorted(p.name for p in (root / "classifier").iterdir()) == [
        Path(store.manifest["classifier"]["path"]).name]
    db = Database(root / "service.db")
    assert [e["action"] for e in db.audit_log("b")] == ["exclude", "purge"]
    assert traces(root, "b") == []


def test_add_from_the_shell_first_finishes_what_a_crash_interrupted(store_copy, data_dir):
    """A forget killed after its purge committed, before its keys were revoked: the
    next `cdm add` (an entry point that changes the store) runs recovery first, so the
    forgotten contributor's key is revoked and its purge recorded before anything else."""
    from service.auth import create_key

    root = store_copy.root
    key = create_key(Database(root / "service.db"), "bee", None, role="contributor",
                     contributor_id="b")
    killed = cdm("forget", "b", "--store", str(root), crash_at="purge:committed")
    assert killed.returncode == -9, killed.stderr[-2000:]
    db = Database(root / "service.db")
    key_id = key.split("_")[1]
    assert db.get_key(key_id)["revoked_at"] is None  # the crash came before the revocation
    folder = root.parent / "dora"
    shutil.copytree(data_dir / "contributors" / "c", folder)
    added = cdm("add", str(folder), "--store", str(root), "--device", "cpu")
    assert added.returncode == 0, added.stderr[-2000:]
    assert db.get_key(key_id)["revoked_at"] is not None
    assert [e["action"] for e in db.audit_log("b")] == ["exclude", "purge"]
    assert [e["action"] for e in db.audit_log("dora")] == ["add"]
