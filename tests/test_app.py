"""The BentoML app through an ASGI test client: authorization matrix, bad inputs,
metrics and health endpoints."""

import os

import pytest
from conftest import wait_for_job
from starlette.testclient import TestClient

from service.auth import create_key
from service.db import Database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(full_store, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("app") / "store"
    shutil.copytree(full_store.root, root)
    prom = tmp_path_factory.mktemp("prom")
    old = {k: os.environ.get(k) for k in ("CDM_STORE", "PROMETHEUS_MULTIPROC_DIR", "CDM_DATA_ROOTS")}
    os.environ.update(CDM_STORE=str(root), PROMETHEUS_MULTIPROC_DIR=str(prom),
                      CDM_DATA_ROOTS=str(tmp_path_factory.getbasetemp()))
    from service.app import CDMService

    db = Database(root / "service.db")
    keys = {"user": create_key(db, "user", ["a", "b"]), "other": create_key(db, "other", ["c"]),
            "admin": create_key(db, "admin", None, role="admin"), "none": None,
            "alice": create_key(db, "alice-herself", None, role="contributor", contributor_id="a"),
            "bad": "cdm_000000000000_wrong"}
    with TestClient(CDMService.to_asgi()) as c:
        c.keys = keys
        yield c
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def auth(client, who):
    return {"Authorization": f"Bearer {client.keys[who]}"}


def call(client, endpoint, who, body=None, **kw):
    key = client.keys[who]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post(f"/{endpoint}", json={} if body is None else body, headers=headers, **kw)


def test_generate_matrix_and_payload(client):
    body = {"contributors": ["a"], "n": 2, "steps": 2, "seed": 0}
    expected = {"none": 401, "bad": 401, "user": 200, "other": 403, "admin": 200}
    for who, status in expected.items():
        r = call(client, "generate", who, body)
        assert r.status_code == status, (who, r.text)
    r = call(client, "generate", "other", body)
    assert "not licensed for: a" in r.json()["error"]
    r = call(client, "generate", "user", {"contributors": ["zed"], "n": 1, "steps": 1})
    assert r.status_code == 404 and "zed" in r.json()["error"]
    out = call(client, "generate", "user", {"n": 2, "steps": 2}).json()
    assert out["contributors"] == ["a", "b"] and len(out["images"]) == 2
    assert set(out["attribution"]) == {"a", "b"}


def test_attribution_matrix(client):
    rid = call(client, "generate", "user", {"n": 1, "steps": 1}).json()["request_id"]
    # another user's request reads as no request at all
    for who, status in {"none": 401, "user": 200, "other": 404, "admin": 200}.items():
        assert call(client, "attribution", who, {"request_id": rid}).status_code == status, who
    assert call(client, "attribution", "admin", {"request_id": "nope"}).status_code == 404


@pytest.mark.parametrize("endpoint", ["contributors", "credit"])
def test_read_endpoints_need_a_valid_key(client, endpoint):
    for who, status in {"none": 401, "bad": 401, "user": 200, "other": 200, "admin": 200}.items():
        assert call(client, endpoint, who).status_code == status, who


def test_credit_and_contributors_payload(client):
    call(client, "generate", "other", {"n": 3, "steps": 1})
    credit = call(client, "credit", "other").json()["contributors"]
    assert credit["c"]["usage"]["samples"] >= 3 and 0 < credit["c"]["usage"]["share"] <= 1
    assert "payout_share" not in credit["c"]  # users see usage only
    assert "c" not in call(client, "credit", "user").json()["contributors"]  # others' usage
    admin = call(client, "credit", "admin").json()
    assert admin["contributors"]["c"]["usage"]["samples"] >= 3
    ids = [c["contributor_id"] for c in call(client, "contributors", "user").json()["contributors"]]
    assert {"a", "b"} <= set(ids)


@pytest.mark.parametrize("body, fragment", [
    ({"n": 0}, "greater than or equal to 1"),
    ({"n": 10000}, "less than or equal to 64"),
    ({"n": "many"}, "valid integer"),
    ({"n": "4"}, "valid integer"),  # strict: no coercion
    ({"n": True}, "valid integer"),
    ({"n": 4.0}, "valid integer"),
    ({"contributors": ["x" * 65]}, "at most 64 characters"),
    ({"n": 1, "colour": "red"}, "Extra inputs are not permitted"),
    ({"contributors": "a"}, "valid array"),
    ({"contributors": []}, "at least 1"),
    ({"mode": "naive"}, "Extra inputs are not permitted"),  # a baseline of the CLI only
    ({"scheduler": "euler"}, "ddpm"),
    ({"contributors": ["a"], "n": 1, "steps": 1, "mass": 0}, "greater than 0"),
    ({"steps": 0}, "greater than or equal to 1"),
    ({"draw_above": -1}, "greater than or equal to 0"),
    ({"draw_above": 1.5}, "valid integer"),
])
def test_bad_generate_inputs_are_400_with_a_message(client, body, fragment):
    r = call(client, "generate", "admin", body)
    assert r.status_code == 400, r.text
    assert fragment in r.text


def test_authentication_comes_before_validation(client):
    for who in ("none", "bad"):
        r = call(client, "generate", who, {"n": "many", "colour": "red"})
        assert r.status_code == 401 and "detail" not in r.json() and "colour" not in r.text


def test_errors_do_not_echo_big_inputs(client):
    r = call(client, "generate", "admin", {"contributors": [f"z{i:03d}" + "z" * 60 for i in range(200)], "n": 1, "steps": 1})
    assert r.status_code == 404 and len(r.content) < 2000, len(r.content)
    r = call(client, "attribution", "admin", {"request_id": "q" * 64})
    assert r.status_code == 404 and len(r.content) < 300


def test_a_body_that_is_not_json_is_415(client):
    r = client.post("/generate", content=b"n=1", headers={
        **auth(client, "admin"), "Content-Type": "multipart/form-data"})
    assert r.status_code == 415 and r.json() == {"error": "send the body as application/json"}


def test_malformed_json_is_400(client):
    r = client.post("/generate", content=b"{not json", headers={
        "Authorization": f"Bearer {client.keys['admin']}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.text


def test_forget_id_is_validated(client):
    r = call(client, "forget", "admin", {"contributor_id": "../etc"})
    assert r.status_code == 400
    assert call(client, "forget", "admin", {"contributor_id": "zed"}).status_code == 404
    assert call(client, "job", "admin", {"job_id": "nope"}).status_code == 404


def test_metrics_and_health(client):
    call(client, "generate", "user", {"contributors": ["b"], "n": 2, "steps": 1})
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(client, "user")).status_code == 403
    for method in ("POST", "TRACE", "DELETE"):  # 405 whatever the key: nothing else is there
        for who in ("user", "admin", None):
            out = client.request(method, "/metrics", headers=auth(client, who) if who else {})
            assert out.status_code == 405 and out.headers["allow"] == "GET, HEAD", (method, who)
    spec = client.get("/docs.json").json()
    documented = spec["paths"]["/metrics"]["get"]["responses"]
    assert {"200", "401", "403", "429"} <= set(documented)
    text = client.get("/metrics", headers=auth(client, "admin")).text
    assert 'cdm_generated_samples_total{contributor="b"}' in text
    assert "cdm_generate_latency_seconds_bucket" in text
    resident = [line for line in text.splitlines() if line.startswith("cdm_shard_cache_resident{")]
    assert resident and float(resident[0].split()[1]) >= 1  # b was loaded on demand
    assert "cdm_shard_cache_misses{" in text and "cdm_shard_cache_hits{" in text
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200
    spec = client.get("/docs.json").json()
    assert {"/generate", "/forget", "/job", "/add_contributor", "/contributors", "/attribution",
            "/credit", "/history"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    generate = spec["paths"]["/generate"]["post"]
    assert generate["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "403", "404", "429", "503"} <= set(generate["responses"])


def test_admin_endpoints_matrix_then_forget(client, data_dir, tmp_path):
    import shutil

    shutil.copytree(data_dir / "contributors" / "a", tmp_path / "eve")
    body = {"folder": str(tmp_path / "eve")}
    for who, status in {"none": 401, "user": 403, "other": 403}.items():
        assert call(client, "add_contributor", who, body).status_code == status, who
        assert call(client, "forget", who, {"contributor_id": "a"}).status_code == status, who
    r = call(client, "add_contributor", "admin", body)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    for who, status in {"none": 401, "user": 404, "other": 404}.items():  # not theirs: no job
        assert call(client, "job", who, {"job_id": job_id}).status_code == status, who
    job = wait_for_job(lambda: call(client, "job", "admin", {"job_id": job_id}).json())
    assert job["status"] == "succeeded", job
    r = call(client, "forget", "admin", {"contributor_id": "eve"})
    assert r.status_code == 200 and r.json()["excluded"] is True
    purge_id = r.json()["job_id"]
    record = r.json()["audit"]  # the exclusion's record rides on the acknowledgement
    assert (record["action"], record["contributor_id"]) == ("exclude", "eve")
    assert record["details"]["job_id"] == purge_id
    r = call(client, "generate", "admin", {"contributors": ["eve"], "n": 1, "steps": 1})
    assert r.status_code == 404
    job = wait_for_job(lambda: call(client, "job", "admin", {"job_id": purge_id}).json())
    assert job["status"] == "succeeded", job


def test_concurrent_generates_match_sequential_ones(client):
    from concurrent.futures import ThreadPoolExecutor

    def gen(seed):
        r = call(client, "generate", "admin", {"n": 2, "steps": 3, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["images"]

    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(gen, range(8)))
    assert [gen(seed) for seed in range(8)] == concurrent
    assert "cdm_generate_batch_requests_count" in client.get("/metrics", headers=auth(client, "admin")).text


def test_value_endpoint_matrix_and_inputs(client, heldout):
    body = {"n": 8, "steps": 1, "heldout": str(heldout)}  # default methods: exact, beta-shapley
    for who, status in {"none": 401, "user": 403, "other": 403}.items():
        assert call(client, "value", who, body).status_code == status, who
    r = call(client, "value", "admin", {**body, "methods": ["magic"]})
    assert r.status_code == 400
    r = call(client, "value", "admin", {**body, "property": "aesthetic"})
    assert r.status_code == 400
    r = call(client, "value", "admin", body)
    assert r.status_code == 200, r.text
    job = wait_for_job(lambda: call(client, "job", "admin", {"job_id": r.json()["job_id"]}).json())
    assert job["status"] == "succeeded", job
    credit = call(client, "credit", "admin").json()
    assert credit["valuations"]["precision"]["method"] == "exact"  # the default property
    # the default payout policy (exact Shapley of precision) now has its valuation:
    # shares sum to 1, or are all 0 when no value is positive (1-step samples of a tiny
    # store)
    shares = [r["payout_share"] for r in credit["contributors"].values() if r["live"]]
    assert None not in shares and min(shares) >= 0
    assert sum(shares) == pytest.approx(1.0) or sum(shares) == 0
    assert call(client, "credit", "user").json()["valuations"] == {}


def test_value_heldout_must_lie_under_the_data_roots(client):
    for folder in ("/", "/etc", "/proc"):
        r = call(client, "value", "admin", {"methods": ["exact"], "heldout": folder})
        assert r.status_code == 404 and "outside the allowed data roots" in r.json()["error"]
        assert "passwd" not in r.text


def test_a_contributor_key_acts_for_its_contributor_only(client):
    call(client, "generate", "admin", {"contributors": ["a", "c"], "n": 2, "steps": 1})
    credit = call(client, "credit", "alice").json()
    assert set(credit["contributors"]) == {"a"}
    history = call(client, "history", "alice", {"limit": 5}).json()["requests"]
    assert history and all(set(r) == {"request_id", "created_at", "samples", "mass"} for r in history)
    assert call(client, "generate", "alice", {"n": 1, "steps": 1}).status_code == 403
    assert call(client, "forget", "alice", {"contributor_id": "c"}).status_code == 403
    assert call(client, "add_contributor", "alice", {"folder": "/tmp"}).status_code == 403
    own = call(client, "history", "user", {}).json()["requests"]
    assert own and all(r["user"] == "user" for r in own)


def test_revoked_key_is_refused_on_the_next_request(client):
    from service.db import Database

    key = create_key(Database(os.environ["CDM_STORE"] + "/service.db"), "temp", ["a"])
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/contributors", json={}, headers=headers).status_code == 200
    Database(os.environ["CDM_STORE"] + "/service.db").revoke_key(key.split("_")[1])
    r = client.post("/contributors", json={}, headers=headers)
    assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_payout_policy_endpoint(client):
    body = {"property": "recall", "method": "banzhaf-msr"}
    assert call(client, "payout_policy", "user", body).status_code == 403
    assert call(client, "payout_policy", "none", body).status_code == 401
    r = call(client, "payout_policy", "admin", body)
    assert r.status_code == 409 and "no recorded valuation gives banzhaf-msr values of recall" \
        in r.json()["error"]
    assert call(client, "payout_policy", "admin", {"property": "recall"}).status_code == 400
    r = call(client, "payout_policy", "admin", {**body, "alpha": 2})
    assert r.status_code == 400 and "'beta-shapley' only" in r.json()["error"]
    r = call(client, "payout_policy", "admin", {"property": "recall", "method": "beta-shapley",
                                                 "alpha": 0})
    assert r.status_code == 400
    r = call(client, "credit", "alice").json()
    assert set(r["contributors"]["a"]) >= {"usage", "payout_share", "live"}
