"""kill -9 at crash points of forgetting, inside a real `cdm serve` with two workers:
one worker dies there (CDM_CRASH_AT, once), BentoML starts another, and the server
finishes the forget by itself. One point per recovery path (an exclusion without its
job, a purge with its plan recorded and files half deleted, a purge committed without
its audit record); test_crash.py kills the CLI at every point, at a tenth of the cost
of a server each. Then the store loads, the audit log is complete,
nothing of the forgotten contributor is on disk, and no live worker holds its weights
(the `cdm_worker_holds_contributor` gauge of each)."""

import shutil
import time
import urllib.request

import pytest
from test_crash import FORGET_POINTS, traces

from service import testing
from service.db import Database
from shards import ShardStore

pytestmark = pytest.mark.integration


def held_by_worker(url: str, key: str, seconds: float = 60.0) -> dict[str, set[str]]:
    """{worker pid: contributors it holds}, from /metrics, until two workers answered."""
    held: dict[str, set[str]] = {}
    deadline = time.monotonic() + seconds
    while len(held) < 2 and time.monotonic() < deadline:
        req = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        mine: dict[str, set[str]] = {}
        for line in text.splitlines():
            if line.startswith("cdm_worker_holds_contributor{"):
                labels = dict(part.split("=") for part in line[line.index("{") + 1:line.index("}")]
                              .replace('"', "").split(","))
                mine.setdefault(labels["worker"], set()).add(labels["contributor"])
        for worker in {line.split('worker="')[1].split('"')[0] for line in text.splitlines()
                       if line.startswith("cdm_shard_cache_capacity{")}:
            held[worker] = mine.get(worker, set())
        time.sleep(0.1)
    return held


def both_generate(url: str, key: str, seconds: float = 90.0) -> list[tuple[int, dict, str]]:
    """Generate requests, 4 at a time, until two workers answered."""
    from concurrent.futures import ThreadPoolExecutor

    answers: list[tuple[int, dict, str]] = []
    deadline = time.monotonic() + seconds
    while len({w for s, _, w in answers if s == 200}) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            answers += pool.map(lambda i: testing.post(url, "generate", key,
                                                       {"n": 1, "steps": 2, "seed": i}), range(8))
        time.sleep(0.2)
    return answers


SERVER_POINTS = ["forget:excluded", "purge:files-deleted", "purge:committed"]
assert set(SERVER_POINTS) <= set(FORGET_POINTS)


@pytest.mark.parametrize("point", SERVER_POINTS)
def test_two_workers_finish_a_forget_killed_at(point, full_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(full_store.root, root)
    admin = testing.cli_key(root, "root", admin=True)
    once = tmp_path / "crashed"
    env = {"CDM_CRASH_AT": point, "CDM_CRASH_ONCE": str(once)}
    with testing.serving(root, tmp_path / "serve.log", workers=2, env=env, timeout=120) as s:
        warm = both_generate(s.url, admin)
        assert len({w for st, _, w in warm if st == 200}) == 2, warm
        before = held_by_worker(s.url, admin)
        assert len(before) == 2 and all("b" in held for held in before.values()), before
        try:
            status, body, _ = testing.post(s.url, "forget", admin, {"contributor_id": "b"})
        except OSError:  # the worker that took the request died before answering
            status, body = 0, {}
        if point.startswith("forget:"):
            assert status != 200, body
        else:
            assert status == 200, body
        db = Database(root / "service.db")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            purges = db.jobs(kind="purge")
            if purges and all(j["status"] == "succeeded" for j in purges) \
                    and not ShardStore.open(root).pending_purges:
                break
            time.sleep(0.3)
        log = (tmp_path / "serve.log").read_text(errors="replace")[-4000:]
        assert once.exists(), log  # a worker did die at the point
        assert [j["status"] for j in db.jobs(kind="purge")] == ["succeeded"], log
        after = both_generate(s.url, admin)
        served = {w for st, _, w in after if st == 200}
        assert len(served) == 2 and all(st == 200 for st, _, _ in after), (after, log)
        assert all(out["contributors"] == ["a", "c"] for _, out, _ in after)
        held = held_by_worker(s.url, admin)
        assert set(held) == served, (held, served)  # the two live workers
        assert all(h == {"a", "c"} for h in held.values()), held
    store = ShardStore.open(root)
    assert store.contributor_ids == ["a", "c"] and store.pending_purges == []
    store.load_sampler("cpu")(None, n=1, steps=1)
    assert [e["action"] for e in db.audit_log("b")] == ["exclude", "purge"]
    assert traces(root, "b") == []
    assert all(j["status"] in ("succeeded", "failed") for j in db.jobs())
