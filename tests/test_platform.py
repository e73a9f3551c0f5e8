"""The service's logic through library calls, without HTTP."""

import base64
import io
import threading

import numpy as np
import pytest
from conftest import wait_for_job
from PIL import Image

from service.auth import ForbiddenError, create_key
from service.errors import NotFoundError
from service.platform import Platform
from shards import ShardStore
from shards.errors import UnknownContributorError
from valuation.utility import store_cache

# the same suite on the SQLite file in the store and on a Postgres database
pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture()
def platform(store_copy):
    p = Platform(store_copy.root, device="cpu")
    yield p
    p.close()


def principal(platform, user, license, role="user"):
    return platform.verify(f"Bearer {create_key(platform.db, user, license, role)}")


def decode(png_b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


def test_generate_uses_exactly_the_licensed_live_contributors(platform):
    user = principal(platform, "u", ["a", "b"])
    out = platform.generate(user, n=3, steps=3, seed=1)
    assert out["contributors"] == ["a", "b"]
    assert len(out["images"]) == 3 and decode(out["images"][0]).shape == (8, 8)
    att = np.array([out["attribution"][c] for c in ["a", "b"]])
    np.testing.assert_allclose(att.sum(0), 1, atol=1e-5)
    with pytest.raises(ForbiddenError, match="not licensed for: c"):
        platform.generate(user, contributors=["a", "c"], n=1, steps=1)
    with pytest.raises(UnknownContributorError, match="zed"):
        platform.generate(user, contributors=["zed"], n=1, steps=1)
    with pytest.raises(ValueError, match="twice"):
        platform.generate(user, contributors=["a", "a"], n=1, steps=1)
    nobody = principal(platform, "n", [])
    with pytest.raises(ForbiddenError, match="licensed for no live contributor"):
        platform.generate(nobody, n=1, steps=1)


def test_same_seed_same_images(platform):
    admin = principal(platform, "adm", None, "admin")
    a = platform.generate(admin, n=2, steps=3, seed=9)
    b = platform.generate(admin, n=2, steps=3, seed=9)
    assert a["images"] == b["images"] and a["request_id"] != b["request_id"]


def test_ledger_attribution_and_credit(platform):
    user = principal(platform, "u", ["a", "b"])
    other = principal(platform, "o", ["c"])
    admin = principal(platform, "adm", None, "admin")
    out = platform.generate(user, n=4, steps=2, seed=0)
    # durable: a fresh connection (another process would do the same) sees the row
    row = platform.db.get_request(out["request_id"])
    assert row is not None and row["user"] == "u"
    assert platform.attribution(user, out["request_id"])["attribution"] == out["attribution"]
    assert platform.attribution(admin, out["request_id"])["user"] == "u"
    with pytest.raises(NotFoundError):  # another user's request reads as no request at all
        platform.attribution(other, out["request_id"])
    with pytest.raises(NotFoundError):
        platform.attribution(user, "nope")
    platform.generate(other, n=2, steps=2, seed=0)
    credit = {c: r["usage"] for c, r in platform.credit(admin)["contributors"].items()}
    assert credit["a"]["samples"] == 4 and credit["c"]["samples"] == 2
    assert credit["a"]["mass"] == pytest.approx(sum(out["attribution"]["a"]))
    assert credit["c"]["mass"] == pytest.approx(2.0)
    assert sum(r["share"] for r in credit.values()) == pytest.approx(1.0)
    text = platform.metrics.exposition()
    assert 'cdm_generated_samples_total{contributor="a"} 4.0' in text
    assert "cdm_generate_latency_seconds_count 2.0" in text


def test_forget_excludes_before_returning_then_purges(platform):
    admin = principal(platform, "adm", None, "admin")
    user = principal(platform, "u", ["a", "b"])
    with pytest.raises(ForbiddenError, match="may not forget 'a'"):
        platform.forget(user, "a")
    job = platform.forget(admin, "b")
    # from the acknowledgement on, no request may use b
    assert platform.generate(user, n=1, steps=1)["contributors"] == ["a"]
    with pytest.raises(UnknownContributorError, match="b"):
        platform.generate(admin, contributors=["b"], n=1, steps=1)
    done = wait_for_job(lambda: platform.job(admin, job["job_id"]))
    assert done["status"] == "succeeded", done
    assert not (platform.store.root / "shards" / "b").exists()
    assert "b" not in platform.live.sampler.classifier_ids  # nothing in memory serves b
    actions = [(e["action"], e["contributor_id"]) for e in platform.db.audit_log("b")]
    assert actions == [("exclude", "b"), ("purge", "b")]
    purge = platform.db.audit_log("b")[1]["details"]
    assert purge["deleted"] == ["shards/b", "router/b"] and len(purge["data_hash"]) == 64
    with pytest.raises(UnknownContributorError):
        platform.forget(admin, "b")


def test_forgotten_platform_generates_like_a_store_built_without(platform, datasets, tiny_config,
                                                                 public, tmp_path):
    admin = principal(platform, "adm", None, "admin")
    job = platform.forget(admin, "c")
    assert wait_for_job(lambda: platform.job(admin, job["job_id"]))["status"] == "succeeded"
    never = ShardStore.create(tmp_path / "never", datasets[:2], tiny_config, public=public,
                              device="cpu", progress=False)
    fresh = Platform(never.root, device="cpu")
    try:
        admin2 = principal(fresh, "adm", None, "admin")
        a = platform.generate(admin, n=3, steps=4, seed=5)
        b = fresh.generate(admin2, n=3, steps=4, seed=5)
        for x, y in zip(a["images"], b["images"], strict=True):
            assert np.abs(decode(x).astype(int) - decode(y).astype(int)).max() <= 1
        np.testing.assert_allclose(a["attribution"]["a"], b["attribution"]["a"], atol=1e-5)
    finally:
        fresh.close()


def test_a_purge_waits_for_a_request_in_flight_that_uses_the_contributor(platform):
    """A request that uses a and started before a's exclusion keeps a's shard until it
    ends: the purge waits for it (the files stay while it runs), the request's images
    use a, and the purge ends after it. Requests after the acknowledgement never use a."""
    import time

    admin = principal(platform, "adm", None, "admin")
    finished = {}

    def run():
        finished["out"] = platform.generate(admin, contributors=["a", "b"], n=4, steps=300,
                                            seed=0, mass=1.0)
        finished["at"] = time.time()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not platform._scheduler.load["batches"] and time.monotonic() < deadline:
        time.sleep(0.01)  # in flight and sampling: admitted before the forget
    job = platform.forget(admin, "a")
    after = platform.generate(admin, n=2, steps=2, seed=1)
    assert "a" not in after["contributors"]
    time.sleep(1.0)
    assert thread.is_alive(), "the request ended too soon to show the wait"
    assert (platform.store.root / "shards" / "a").exists()  # the purge waits for it
    assert platform.job(admin, job["job_id"])["status"] == "running"
    thread.join()
    out = finished["out"]
    assert out["contributors"] == ["a", "b"] and min(out["attribution"]["a"]) > 0
    done = wait_for_job(lambda: platform.job(admin, job["job_id"]))
    assert done["status"] == "succeeded" and done["finished_at"] >= finished["at"]
    assert not (platform.store.root / "shards" / "a").exists()


def test_generate_routing_options(platform):
    admin = principal(platform, "adm", None, "admin")
    dense = platform.generate(admin, n=2, steps=3, seed=1, routing="dense")
    full_mass = platform.generate(admin, n=2, steps=3, seed=1, routing="topk", mass=1.0)
    assert dense["images"] == full_mass["images"]
    for cid, values in dense["attribution"].items():
        assert values == pytest.approx(full_mass["attribution"][cid], abs=1e-6)
    top1 = platform.generate(admin, n=2, steps=3, seed=1, routing="topk", top_k=1)
    assert set(top1["attribution"]) == {"a", "b", "c"}  # attribution keeps the full w^S
    # top_k is "at most k": above |S| it is cut to |S| (dense), and the ledger says so
    wide = platform.generate(admin, n=2, steps=3, seed=1, routing="topk", top_k=4)
    assert wide["images"] == dense["images"]
    assert platform.attribution(admin, wide["request_id"])["params"]["top_k"] == 3
    with pytest.raises(ValueError, match="mass=1.5"):
        platform.generate(admin, n=1, steps=1, routing="topk", mass=1.5)
    with pytest.raises(ValueError, match="needs mode 'composed'"):
        platform.generate(admin, n=1, steps=1, mode="naive", routing="topk", top_k=1)
    everyone = 10**9  # in flight at any generation
    assert platform.db.inflight_since(everyone) == []  # every prepared request was released
    # a prepared request that is never sampled (the client went away) is released
    job = platform.prepare_generation(admin, None, 1, 1, 0, "composed", "ddpm")
    assert [r["seq"] for r in platform.db.inflight_since(everyone)] == [job.seq]
    platform.release(job.seq)
    assert platform.db.inflight_since(everyone) == []


def test_purge_resumes_after_a_crash(store_copy):
    store_copy.exclude("a")  # the process died after the exclusion, before the purge
    platform = Platform(store_copy.root, device="cpu")
    try:
        wait_for_job(lambda: {"status": "succeeded" if platform.db.jobs() else "waiting"}, 30)
        [job] = platform.db.jobs()
        assert job["kind"] == "purge" and job["actor"] == "system"
        done = wait_for_job(lambda: platform.db.get_job(job["job_id"]))
        assert done["status"] == "succeeded", done
        assert platform.store.pending_purges == [] and not (store_copy.root / "shards" / "a").exists()
    finally:
        platform.close()


def test_add_contributor_job(platform, data_dir, tmp_path):
    import shutil

    admin = principal(platform, "adm", None, "admin")
    shutil.copytree(data_dir / "contributors" / "c", tmp_path / "dora")
    with pytest.raises(ForbiddenError):
        platform.add_contributor(principal(platform, "u", None), str(tmp_path / "dora"))
    with pytest.raises(NotFoundError, match="does not exist"):
        platform.add_contributor(admin, str(tmp_path / "missing"))
    job = platform.add_contributor(admin, str(tmp_path / "dora"))
    done = wait_for_job(lambda: platform.job(admin, job["job_id"]))
    assert done["status"] == "succeeded", done
    assert "dora" in [c["contributor_id"] for c in platform.contributors()]
    assert platform.generate(admin, contributors=["dora"], n=1, steps=1)["contributors"] == ["dora"]


@pytest.fixture()
def joint_platform(joint_copy, heldout, monkeypatch):
    import os

    monkeypatch.setenv("CDM_DATA_ROOTS", os.pathsep.join([str(joint_copy.root.parent),
                                                          str(heldout.parent)]))
    p = Platform(joint_copy.root, device="cpu")
    yield p
    p.close()


def test_value_job_feeds_credit_and_forget_drops_what_depends_on_the_contributor(joint_platform,
                                                                               heldout):
    platform = joint_platform
    admin = principal(platform, "adm", None, "admin")
    user = principal(platform, "u", ["a"])
    with pytest.raises(ForbiddenError):
        platform.value(user)
    with pytest.raises(ValueError, match="allowed"):
        platform.value(admin, methods=["magic"])
    with pytest.raises(ValueError, match="unknown valuation settings"):
        platform.value(admin, colour="red")
    started = platform.value(admin, property="quality", methods=["exact", "retrain"], n=16, steps=2,
                             retrain_steps=5,
                             heldout=str(heldout))
    job = wait_for_job(lambda: platform.job(admin, started["job_id"]))
    assert job["status"] == "succeeded", job
    exact = job["result"]["methods"]["exact"]
    assert exact["efficiency_gap"] <= 1e-9
    credit = platform.credit(admin)
    assert credit["valuations"]["quality"]["method"] == "exact"
    assert credit["contributors"]["a"]["shapley"]["quality"] == exact["values"]["a"]
    # payout: the default policy (exact Shapley of precision) has no valuation yet
    assert credit["contributors"]["a"]["payout_share"] is None
    assert credit["payout_policy"]["policy"]["set_by"] == "default"
    assert "no recorded valuation gives exact values of precision" in credit["payout_policy"]["note"]
    from shards.errors import StoreError

    with pytest.raises(StoreError, match="recorded: exact values of quality, retrain values of "
                                         "quality"):
        platform.set_payout_policy(admin, "quality", "banzhaf")
    with pytest.raises(ForbiddenError):
        platform.set_payout_policy(user, "quality", "exact")
    with pytest.raises(ValueError, match="'beta-shapley' only"):
        platform.set_payout_policy(admin, "quality", "exact", alpha=2.0)
    with pytest.raises(ValueError, match="both > 0"):
        platform.set_payout_policy(admin, "quality", "beta-shapley", beta=0.0)
    # a policy pays only by values of its own parameters: Beta(4, 1) values do not stand
    # in for the default Beta(16, 1)
    started = platform.value(admin, property="quality", methods=["beta-shapley"], alpha=4.0,
                             n=16, steps=2)
    assert wait_for_job(lambda: platform.job(admin, started["job_id"]))["status"] == "succeeded"
    with pytest.raises(StoreError, match=r"beta-shapley \(alpha 4, beta 1\) values of quality"):
        platform.set_payout_policy(admin, "quality", "beta-shapley")
    out = platform.set_payout_policy(admin, "quality", "beta-shapley", alpha=4.0)
    assert out["policy"]["params"] == {"alpha": 4.0, "beta": 1.0}
    assert sum(out["shares"].values()) == pytest.approx(1.0) or sum(out["shares"].values()) == 0
    platform.set_payout_policy(admin, "quality", "retrain")
    rows = platform.credit(admin)["contributors"]
    shares = {c: rows[c]["payout_share"] for c in "abc"}
    assert sum(shares.values()) == pytest.approx(1.0) and min(shares.values()) >= 0
    retrain = job["result"]["methods"]["retrain"]["values"]
    positive = {c: max(0.0, v) for c, v in retrain.items()}
    for c in "abc":
        assert shares[c] == pytest.approx(positive[c] / sum(positive.values()))

    forget = platform.forget(admin, "c")
    assert wait_for_job(lambda: platform.job(admin, forget["job_id"]))["status"] == "succeeded"
    audit = [r for r in platform.db.audit_log("c") if r["action"] == "purge"][0]
    # 8 composition values, their 7 sample files, 4 retrain coalitions with c, and the
    # three recorded valuations (exact, retrain, and Beta(4, 1) Shapley)
    assert audit["details"]["valuation_caches_dropped"] == 8 + 7 + 4 + 3
    left = store_cache(platform.store).entries()
    assert left and all("c" not in e["depends_on"] for _, e in left)
    after = platform.credit(admin)
    assert "quality" not in after["valuations"]
    assert after["contributors"]["a"]["payout_share"] is None  # its valuation valued c
    assert "run value again" in after["payout_policy"]["note"]


def test_cost_limits_per_request_and_per_key(store_copy):
    from service.auth import RateLimitError
    from service.generation import Limits

    platform = Platform(store_copy.root, device="cpu",
                        limits=Limits(request_cost=20, key_cost_per_minute=30))
    try:
        user = principal(platform, "u", None)
        with pytest.raises(ValueError, match="exceeds this server's per-request limit 20"):
            platform.generate(user, n=3, steps=7, top_k=1)
        platform.generate(user, n=2, steps=10, top_k=1)  # 20 shard evaluations
        with pytest.raises(RateLimitError) as err:  # 20 + 20 > 30 within the minute
            platform.generate(user, n=2, steps=10, top_k=1)
        assert 1 <= err.value.retry_after <= 60
        platform.generate(user, n=1, steps=10, top_k=1)  # 30: still within
        other = principal(platform, "o", None)  # spend is per key
        platform.generate(other, n=2, steps=10, top_k=1)
        assert platform.db.inflight_since(10**9) == []  # refused requests hold nothing
    finally:
        platform.close()


def test_requests_per_minute_per_key(store_copy):
    """A flood of the cheapest requests is bounded by count, not only by cost: the
    server's work per request (auth, admission, ledger) does not shrink with n x steps.
    A refunded request (its client left) still counts as sent."""
    from service.auth import RateLimitError
    from service.generation import Limits

    platform = Platform(store_copy.root, device="cpu",
                        limits=Limits(request_cost=10**6, key_cost_per_minute=10**9,
                                      key_requests_per_minute=3))
    try:
        user = principal(platform, "u", None)
        for _ in range(3):
            platform.generate(user, n=1, steps=1, top_k=1)
        platform.db.refund(user.key_id, 1)
        with pytest.raises(RateLimitError, match="3 requests per minute") as err:
            platform.generate(user, n=1, steps=1, top_k=1)
        assert 55 <= err.value.retry_after <= 60  # the oldest of the three expires first
        platform.generate(principal(platform, "o", None), n=1, steps=1, top_k=1)  # per key
    finally:
        platform.close()


def test_cost_counts_the_shards_an_image_runs_on(store_copy):
    """One unit buys one shard evaluation: dense routing ({"mass": 1}) over three
    contributors costs three times top-1, a mass alone is charged as dense, and a
    request that may run an image on more shards than the cap is refused."""
    from service.generation import Limits

    platform = Platform(store_copy.root, device="cpu", serve=False,
                        limits=Limits(request_cost=10_000, key_cost_per_minute=10**9,
                                      shards_per_image=2))
    user = principal(platform, "u", None)
    spent = platform.db.spent
    platform.generate(user, n=2, steps=3, top_k=1)
    assert spent() == 2 * 3 * 1
    platform.generate(user, contributors=["a", "b"], n=2, steps=3, mass=1.0)
    assert spent() == 6 + 2 * 3 * 2
    with pytest.raises(ValueError, match="each image on 3 shards at a step; the limit is 2"):
        platform.generate(user, n=1, steps=1, mass=1.0)  # all three: dense
    platform.generate(user, n=1, steps=1, top_k=2)  # the default top_k 3 is cut to 2 here
    assert spent() == 18 + 2
    assert platform.db.inflight_since(10**9) == []


def test_a_contributor_forgets_itself_and_its_keys_end_with_it(platform):
    from service.auth import AuthError

    key = create_key(platform.db, "bob-himself", None, role="contributor", contributor_id="b")
    bob = platform.verify(f"Bearer {key}")
    with pytest.raises(ForbiddenError, match="may not forget 'a'"):
        platform.forget(bob, "a")
    job = platform.forget(bob, "b")
    done = wait_for_job(lambda: platform.job(bob, job["job_id"]))  # it may follow its own job
    assert done["status"] == "succeeded" and done["result"]["contributor_keys_revoked"] == 1
    [exclude, purge] = platform.db.audit_log("b")
    assert exclude["actor"] == "bob-himself" and exclude["details"]["self_request"] is True
    assert purge["details"]["self_request"] is True
    with pytest.raises(AuthError, match="revoked"):  # a later "b" is someone else
        platform.verify(f"Bearer {key}")


def test_payout_shares_floor_negative_values_and_sum_to_one():
    from service.credit import payout_shares

    assert payout_shares({"a": 3.0, "b": 1.0, "m": -2.0}, {"a", "b", "m"}) == {
        "a": 0.75, "b": 0.25, "m": 0.0}
    assert payout_shares({"a": 1.0, "gone": 5.0}, {"a"}) == {"a": 1.0}  # only the live
    assert payout_shares({"a": -1.0, "b": 0.0}, {"a", "b"}) == {"a": 0.0, "b": 0.0}


def test_a_forget_asked_again_answers_with_the_purge_in_progress(store_copy):
    """Asked again while the purge runs (a client retrying after a timeout), forget
    answers with the same purge job, not 404."""
    platform = Platform(store_copy.root, device="cpu", serve=False)  # no runner: it waits
    admin = principal(platform, "adm", None, "admin")
    first = platform.forget(admin, "b")
    again = platform.forget(admin, "b")
    assert again["job_id"] == first["job_id"] and again["in_progress"] is True
    assert again["audit"]["action"] == "exclude"
    assert [j["job_id"] for j in platform.db.jobs(kind="purge")] == [first["job_id"]]
    platform.run_jobs()
    assert platform.db.get_job(first["job_id"])["status"] == "succeeded"


def test_who_asked_survives_a_crash_between_the_exclusion_and_its_records(store_copy):
    """The exclusion (in the manifest) carries who asked: a crash before the job row and
    the audit record leaves them to recovery, which writes them as that person's, not
    as `system`'s."""
    platform = Platform(store_copy.root, device="cpu", serve=False)
    key = create_key(platform.db, "bee", None, role="contributor", contributor_id="b")
    bee = platform.verify(f"Bearer {key}")
    store_copy.exclude("b", {"actor": bee.user, "self_request": True})  # then: the crash
    platform.run_jobs()
    [job] = platform.db.jobs(kind="purge")
    assert job["actor"] == "bee" and job["params"]["self_request"] is True
    assert job["status"] == "succeeded"
    exclude = platform.db.audit_log("b")[0]
    assert exclude["action"] == "exclude" and exclude["actor"] == "bee"
    assert exclude["details"]["recovered"] is True and exclude["details"]["self_request"] is True


def test_the_drain_knows_a_live_worker_by_its_heartbeat_not_by_host_and_pid(store_copy,
                                                                          monkeypatch):
    """A worker in another container with this host name and a pid that means nothing
    here holds a request from before the exclusion: the purge waits while it beats,
    then takes it for dead once it is silent, and deletes its rows."""
    import socket
    import time

    import service.forget as forget

    monkeypatch.setattr(forget, "PURGE_DRAIN_SECONDS", 30.0)
    monkeypatch.setattr(forget, "WORKER_TIMEOUT_SECONDS", 1.0)
    platform = Platform(store_copy.root, device="cpu", serve=False)
    admin = principal(platform, "adm", None, "admin")
    other = f"{socket.gethostname()}:999999:elsewhere"  # no such pid in this namespace
    assert platform.db.admit("k", 1, None, other, 1, platform.store.generation) is None
    platform.forget(admin, "b")
    purge = threading.Thread(target=platform.run_jobs)
    purge.start()
    beat_until = time.monotonic() + 2.0
    while time.monotonic() < beat_until:  # the other worker is alive and busy
        platform.db.heartbeat(other)
        time.sleep(0.1)
    assert (store_copy.root / "shards" / "b").exists()  # the purge waited for it
    purge.join(timeout=20)  # silent now: taken for dead after about a second
    assert not purge.is_alive() and not (store_copy.root / "shards" / "b").exists()
    assert platform.db.inflight_since(10**9) == []
    assert platform.db.dead_workers(time.time()) == []


def test_a_purge_does_not_wait_for_an_add_that_trains(store_copy, data_dir, monkeypatch):
    """Forgetting never waits for someone else's training: with an add's training held
    up, a forget's purge runs and finishes beside it, then the add finishes too."""
    import shutil

    import shards.builder as builder

    training, release = threading.Event(), threading.Event()
    real = builder.train_shard

    def slow_train_shard(*args, **kwargs):
        training.set()
        release.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(builder, "train_shard", slow_train_shard)
    monkeypatch.setenv("CDM_DATA_ROOTS", str(store_copy.root.parent))
    platform = Platform(store_copy.root, device="cpu")
    try:
        admin = principal(platform, "adm", None, "admin")
        shutil.copytree(data_dir / "contributors" / "c", store_copy.root.parent / "dora")
        added = platform.add_contributor(admin, str(store_copy.root.parent / "dora"))
        assert training.wait(timeout=30)  # the add holds the work lane
        forget = platform.forget(admin, "b")
        purged = wait_for_job(lambda: platform.job(admin, forget["job_id"]), timeout=30)
        assert purged["status"] == "succeeded", purged
        assert platform.job(admin, added["job_id"])["status"] == "running"
        release.set()
        assert wait_for_job(lambda: platform.job(admin, added["job_id"]))["status"] == "succeeded"
        assert ShardStore.open(store_copy.root).contributor_ids == ["a", "c", "dora"]
    finally:
        release.set()
        platform.close()


def test_a_generation_whose_client_left_stops_and_is_refunded(store_copy):
    """The client of a long request leaves: its job leaves the batch before the next
    step, the key is charged only for the steps taken, and its request is released."""
    import time

    from service.generation import Limits
    from service.scheduler import CancelledRequest

    platform = Platform(store_copy.root, device="cpu",
                        limits=Limits(request_cost=10**6, key_cost_per_minute=10**9))
    try:
        user = principal(platform, "u", None)
        job = platform.prepare_generation(user, None, 2, 500, 0, "composed", "ddpm", top_k=1)
        assert job.cost == 2 * 500
        future = platform.submit(job)
        while not platform._scheduler.load["batches"]:
            time.sleep(0.01)
        platform.cancel(job)
        with pytest.raises(CancelledRequest):
            future.result(timeout=60)
        spent = platform.db.spent()
        assert 0 <= spent < job.cost  # refunded: only the steps taken
        deadline = time.monotonic() + 10
        while platform.db.inflight_since(10**9) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert platform.db.inflight_since(10**9) == []
    finally:
        platform.close()


def test_a_short_request_shares_the_steps_of_a_long_one_from_another_key(store_copy):
    """Requests of different step counts and keys share one batch: a 2-step request
    sent while a 400-step one runs finishes long before it, in the same batch (no
    second batch opened), with the images it gets alone."""
    import time

    from service.generation import Limits

    platform = Platform(store_copy.root, device="cpu",
                        limits=Limits(request_cost=10**6, key_cost_per_minute=10**9))
    try:
        big, small = principal(platform, "big", None), principal(platform, "small", None)
        alone = platform.generate(small, None, n=1, steps=2, seed=5)
        long_job = platform.prepare_generation(big, None, 4, 400, 0, "composed", "ddpm")
        long_future = platform.submit(long_job)
        while not platform._scheduler.load["batches"]:
            time.sleep(0.01)
        short_job = platform.prepare_generation(small, None, 1, 2, 5, "composed", "ddpm")
        short = platform.submit(short_job).result(timeout=60)
        assert not long_future.done()
        together = platform.metrics.registry.get_sample_value("cdm_generate_batch_requests_sum")
        assert together == 1 + 2  # `alone` ran by itself; the short one finished beside the long
        from service.generation import to_uint8

        mine = to_uint8(short.images * 2 - 1).astype(int)
        ref = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in alone["images"]])
        assert np.abs(mine.reshape(ref.shape) - ref).max() <= 1  # the same up to float rounding
        platform.cancel(long_job)
    finally:
        platform.close()
