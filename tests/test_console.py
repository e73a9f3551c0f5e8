"""The web console (/ui) in a real browser: headless Chromium (the system package)
driven by Playwright, against one real `cdm serve` over a tiny store, shared by the
module. The tests run in file order: they share the server's state (the customer's
requests feed the contributor's and admin's pages; the contributor removes itself
before the admin adds and forgets). Screenshots and page loads of the default store:
benchmarks/console_shots.py (`make console-shots`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from service import testing
from service.auth import create_key
from service.db import Database
from service.testing import CONSOLE_TABS as TABS
from service.testing import chromium_path, launch, measure_loads, sign_in
from service.testing import page_ready as wait_ready

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- helpers
def missing(message: str):
    """No browser here: a failure in CI (it must run there), a skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def post(base: str, endpoint: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    status, out, _ = testing.post(base, endpoint, key, body)
    return status, out


def no_horizontal_overflow(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def notice(page) -> str:
    page.wait_for_selector("#notice:not([hidden])")
    return page.inner_text("#notice .message")


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pw():
    if chromium_path() is None:
        missing("no chromium binary on PATH (chromium or chromium-browser): "
                "`apt-get install -y chromium` (make test installs it when missing)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(full_store, tmp_path_factory):
    """One server for the module: the tiny store (a, b, c), keys for each role, two
    recorded valuations, and a folder `d` the admin can add."""
    import numpy as np
    from conftest import write_pngs
    from sklearn.datasets import load_digits

    work = tmp_path_factory.mktemp("console")
    root = work / "store"
    shutil.copytree(full_store.root, root)
    digits = load_digits()
    write_pngs(work / "incoming" / "d",
               np.round(digits.images[digits.target == 3][:20] / 16 * 255).astype(np.uint8))
    db = Database(root / "service.db")
    keys = {"ann": create_key(db, "ann", ["a", "b"]), "bea": create_key(db, "bea", ["a"]),
            "root": create_key(db, "root", None, role="admin"),
            "carl": create_key(db, "carl", None, role="contributor", contributor_id="c"),
            "ada": create_key(db, "ada", None, role="contributor", contributor_id="a")}
    # what a valuation run records (values are the test's; the pages draw them)
    db.record_valuation("precision", "exact", {"a": 0.12, "b": 0.05, "c": -0.02}, "primary")
    db.record_valuation("precision", "loo", {"a": 0.08, "b": 0.03, "c": -0.01}, "other")
    time.sleep(0.05)
    db.record_valuation("precision", "exact", {"a": 0.11, "b": 0.06, "c": 0.03}, "primary")
    db.set_payout_policy("root", "precision", "exact")  # pay by the rows above
    with testing.serving(root, work / "serve.log", env={"CDM_DATA_ROOTS": str(work)},
                         timeout=120) as live:
        yield {"base": live.url, "keys": keys, "root": root, "incoming": work / "incoming",
               "shots": Path(os.environ.get("CDM_CONSOLE_SHOTS") or work / "shots")}


@pytest.fixture()
def page(pw):
    context = pw.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught script error on any page


# ------------------------------------------------------------------ tests
def test_static_files_need_no_key_and_hold_no_data(server):
    base = server["base"]
    with urllib.request.urlopen(f"{base}/ui/", timeout=10) as r:
        html = r.read().decode()
        assert r.status == 200 and "app.js" in html
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{base}/ui/{name}", timeout=10) as r:
            assert r.status == 200 and len(r.read()) > 1000
    # nothing from another origin, nothing that needs a build
    assert "http://" not in html and "https://" not in html
    # the API itself still needs a key
    status, out = post(base, "whoami", "")
    assert status == 401 and "Bearer <key>" in out["error"]
    status, me = post(base, "whoami", server["keys"]["carl"])
    assert status == 200 and me == {"user": "carl", "role": "contributor", "contributor_id": "c",
                                    "license": [], "key_id": server["keys"]["carl"].split("_")[1]}


def test_new_read_endpoints_are_scoped_by_role(server):
    base, keys = server["base"], server["keys"]
    for endpoint in ("keys", "jobs", "audit", "valuations"):
        status, out = post(base, endpoint, keys["ann"])
        assert status == 403, (endpoint, out)
    assert post(base, "revoke_key", keys["ann"], {"key_id": "x"})[0] == 403
    assert post(base, "revoke_key", keys["carl"], {"key_id": "x"})[0] == 403
    assert post(base, "keys", keys["carl"])[0] == 403
    status, out = post(base, "revoke_key", keys["root"], {"key_id": "0" * 12})
    assert status == 404 and "no active key" in out["error"]
    status, out = post(base, "valuations", keys["carl"])
    assert status == 200 and all(set(v["values"]) == {"c"} for v in out["valuations"])
    assert [v["method"] for v in out["valuations"]] == ["exact", "loo", "exact"]
    # shares under the policy set above (precision, exact) of the newest row: 0.03 / 0.2
    assert out["valuations"][0]["payout_shares"] == {"c": pytest.approx(0.15)}
    assert out["valuations"][1]["payout_shares"] is None
    status, out = post(base, "keys", keys["root"])
    assert status == 200 and {k["user"] for k in out["keys"]} >= {"ann", "bea", "root", "carl"}
    assert not any("hash" in k or "salt" in k for k in out["keys"])
    assert post(base, "audit", keys["root"], {"limit": 0})[0] == 400


def test_customer_generates_and_sees_each_image_with_its_attribution(server, page):
    base, keys = server["base"], server["keys"]
    sign_in(page, base, keys["ann"])
    wait_ready(page, "generate")
    assert page.is_checked("input[value=a]") and page.is_checked("input[value=b]")
    assert not page.is_checked("input[value=c]")
    assert "not licensed" in page.inner_text("label.unlicensed")
    assert page.query_selector("#label") is None  # the tiny store has no labels
    page.fill("#n", "3")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    page.select_option("#routing", "dense")
    page.click("#generate")
    page.wait_for_selector("#gallery figure.sample >> nth=2")
    figures = page.query_selector_all("#gallery figure.sample")
    assert len(figures) == 3
    request_id = page.inner_text("#request-id")
    status, truth = post(base, "attribution", keys["ann"], {"request_id": request_id})
    assert status == 200 and truth["params"]["n"] == 3 and truth["params"]["mass"] == 1
    for i, fig in enumerate(figures):
        assert fig.eval_on_selector("img", "img => img.complete && img.naturalWidth") == 8
        bars = {r.get_attribute("data-label"): float(r.get_attribute("data-value"))
                for r in fig.query_selector_all("svg rect")}
        assert set(bars) == {"a", "b"}
        assert bars == pytest.approx({c: truth["attribution"][c][i] for c in ("a", "b")}, abs=1e-12)
        assert sum(bars.values()) == pytest.approx(1, abs=1e-5)
    page.screenshot(path=str(shot(server, "user")), full_page=True)
    # history and usage
    page.click("a[data-tab=usage]")
    wait_ready(page, "usage")
    row = page.wait_for_selector(f'#history tr[data-request-id="{request_id}"]')
    assert "a, b" in row.inner_text()
    usage = page.inner_text("#usage table")
    assert "a\t3" in usage and "b\t3" in usage
    row.query_selector("button").click()
    page.wait_for_selector("#attribution-detail svg rect")
    assert no_horizontal_overflow(page)


def test_unlicensed_contributor_is_refused_with_the_apis_message(server, page):
    base, keys = server["base"], server["keys"]
    sign_in(page, base, keys["ann"])
    wait_ready(page, "generate")
    page.check("input[value=c]")
    page.fill("#steps", "1")
    page.click("#generate")
    status, out = post(base, "generate", keys["ann"], {"contributors": ["a", "b", "c"], "n": 4,
                                                       "steps": 1})
    assert status == 403
    assert notice(page) == out["error"] == "key of 'ann' is not licensed for: c"
    assert page.query_selector("#gallery") is None  # nothing was generated
    # a body the API refuses: its message and the field's detail, not a blank page
    page.uncheck("input[value=c]")
    page.fill("#n", "999")
    page.click("#generate")
    page.wait_for_selector("#notice:has-text('invalid request body')")
    assert "n: Input should be less than or equal to 64" in page.inner_text("#notice")
    assert page.is_visible("#generate-form")


def test_a_bad_key_is_refused_at_sign_in(server, page):
    sign_in(page, server["base"], "cdm_000000000000_wrong", refused=True)
    assert notice(page) == "Signed out: invalid API key"
    assert page.evaluate("sessionStorage.length") == 0


def test_admin_sees_contributors_keys_audit_jobs_and_valuation(server, page):
    base, keys = server["base"], server["keys"]
    sign_in(page, base, keys["root"])
    wait_ready(page, "contributors")
    rows = page.query_selector_all("#contributors-table tbody tr")
    assert [r.get_attribute("data-contributor") for r in rows] == ["a", "b", "c"]
    text = page.inner_text('#contributors-table tr[data-contributor="a"]')
    assert "φ" in page.inner_text("#contributors-table thead") and "0.11" in text
    # the admin generates with everyone (c gets usage for its own page)
    page.click("a[data-tab=generate]")
    wait_ready(page, "generate")
    page.fill("#n", "2")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_selector("#gallery figure.sample >> nth=1")
    assert {r.get_attribute("data-label") for r in page.query_selector_all("#gallery rect")} \
        == {"a", "b", "c"}
    page.click("a[data-tab=keys]")
    wait_ready(page, "keys")
    users = page.inner_text("#keys table")
    assert all(u in users for u in ("ann", "bea", "root", "carl"))
    page.click("a[data-tab=audit]")
    wait_ready(page, "audit")
    page.click("a[data-tab=valuation]")
    wait_ready(page, "valuation")
    bars = page.query_selector_all("#valuation svg.grouped rect")
    assert {(b.get_attribute("data-group"), b.get_attribute("data-series")) for b in bars} == \
        {(c, m) for c in "abc" for m in ("exact", "loo")}
    exact_a = page.get_attribute('#valuation svg.grouped rect[data-group=a][data-series=exact]',
                                 "data-value")
    assert float(exact_a) == 0.11  # the newest exact row
    assert page.query_selector("#valuation svg.scatter") is not None
    payout = {r.get_attribute("data-label"): float(r.get_attribute("data-value"))
              for r in page.query_selector_all("#valuation svg.bars rect")}
    assert payout == pytest.approx({"a": 0.55, "b": 0.3, "c": 0.15})
    page.screenshot(path=str(shot(server, "admin-valuation")), full_page=True)
    page.click("a[data-tab=contributors]")
    wait_ready(page, "contributors")
    page.screenshot(path=str(shot(server, "admin")), full_page=True)


def test_contributor_sees_its_credit_then_removes_itself(server, pw):
    base, keys = server["base"], server["keys"]
    context = pw.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    sign_in(page, base, keys["carl"])
    wait_ready(page, "mine")
    assert "Contributor c" in page.inner_text("main")
    assert page.inner_text("#stats .stat >> nth=0").startswith("2")  # the admin's 2 images
    charts = page.query_selector_all("#over-time svg")
    assert len(charts) == 3
    assert len(charts[0].query_selector_all("circle")) == 1  # one request used c
    payout = [float(c.get_attribute("data-value")) for c in charts[2].query_selector_all("circle")]
    assert payout == pytest.approx([0.0, 0.15])  # floored at zero, then 0.03 / 0.2
    assert "0.03" in page.inner_text("#shapley")
    page.screenshot(path=str(shot(server, "contributor")), full_page=True)
    page.click("#remove-start")
    assert "for good" in page.inner_text(".confirm")
    page.click("#remove-confirm")
    page.wait_for_selector('.job[data-status="succeeded"]', timeout=60_000)
    page.wait_for_selector("#remove-done p.ok")
    assert "Your data is deleted" in page.inner_text("#remove-done")
    assert "exclude" in page.inner_text("#remove-audit")  # its own record, shown
    assert page.evaluate("sessionStorage.length") == 0
    context.close()
    # the admin: c is no longer live; its past usage stays in the ledger
    context = pw.new_context()
    page = context.new_page()
    sign_in(page, base, keys["root"])
    wait_ready(page, "contributors")
    assert page.query_selector('#contributors-table tr[data-contributor="c"]') is None
    assert page.query_selector('#forgotten-table tr[data-forgotten="c"]') is not None
    page.click("a[data-tab=audit]")
    wait_ready(page, "audit")
    assert page.query_selector('tr[data-action="purge"][data-contributor="c"]') is not None
    context.close()
    status, out = post(base, "whoami", keys["carl"])
    assert status == 401 and out["error"] == "API key revoked"


def test_admin_adds_and_forgets_with_live_job_progress(server, page):
    base, keys = server["base"], server["keys"]
    sign_in(page, base, keys["root"])
    wait_ready(page, "contributors")
    page.fill("#add-folder", "/etc")  # outside CDM_DATA_ROOTS: the API's 404, shown
    page.click("#add")
    assert "data roots" in notice(page)
    page.fill("#add-folder", str(server["incoming"] / "d"))
    page.click("#add")
    panel = page.wait_for_selector(".job")
    assert "Add d" in panel.inner_text()
    page.wait_for_selector('.job[data-status="succeeded"]', timeout=120_000)
    page.wait_for_selector('#contributors-table tr[data-contributor="d"]')
    assert page.inner_text(".job .steps").split() == ["queued", "running", "succeeded"]
    page.click('button[data-forget="b"]')
    page.click('button[data-confirm="b"]')
    page.wait_for_selector('.job:has-text("Forget b")[data-status="succeeded"]', timeout=60_000)
    page.wait_for_selector('#contributors-table tr[data-contributor="b"]', state="detached")
    assert [r.get_attribute("data-contributor")
            for r in page.query_selector_all("#contributors-table tbody tr")] == ["a", "d"]
    assert len(page.query_selector_all(".job")) == 2  # both panels stay
    page.click("a[data-tab=jobs]")
    wait_ready(page, "jobs")
    kinds = {(r.get_attribute("data-status"), r.inner_text().split("\t")[1])
             for r in page.query_selector_all("#jobs tbody tr")}
    assert kinds == {("succeeded", "add"), ("succeeded", "purge")}
    page.click("a[data-tab=audit]")
    wait_ready(page, "audit")
    for action, cid in (("add", "d"), ("purge", "b"), ("exclude", "b")):
        assert page.query_selector(f'tr[data-action="{action}"][data-contributor="{cid}"]')


def test_pages_fit_a_phones_width(server, pw):
    base, keys = server["base"], server["keys"]
    context = pw.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                             has_touch=True, device_scale_factor=2)
    page = context.new_page()
    for key, role in (("ann", "user"), ("ada", "contributor"), ("root", "admin")):
        sign_in(page, base, keys[key])
        for tab in TABS[role]:
            page.goto(f"{base}/ui/#{tab}")
            wait_ready(page, tab)
            assert no_horizontal_overflow(page), (role, tab)
        if role == "user":
            page.goto(f"{base}/ui/#generate")
            wait_ready(page, "generate")
            page.fill("#n", "4")
            page.fill("#steps", "2")
            page.click("#generate")
            page.wait_for_selector("#gallery figure.sample >> nth=3")
            assert no_horizontal_overflow(page)
            page.screenshot(path=str(shot(server, "phone")), full_page=True)
        page.click("#signout")
        wait_ready(page, "signin")
    context.close()


def test_page_load_times_are_measured(server, pw):
    """Each role's pages, loaded afresh; reported (docs/api.md), not asserted."""
    times = measure_loads(pw, server["base"], {r: server["keys"][k] for r, k in
                                               (("user", "ann"), ("contributor", "ada"),
                                                ("admin", "root"))}, repeats=1)
    print("\nconsole page loads (ms, tiny store):", json.dumps(times))
    assert set(times) == {f"{r}/{t}" for r, tabs in TABS.items() for t in tabs}
    assert all(v > 0 for v in times.values())


def test_a_revoked_key_is_signed_out(server, pw):
    base, keys = server["base"], server["keys"]
    bea = pw.new_context().new_page()
    sign_in(bea, base, keys["bea"])
    wait_ready(bea, "generate")
    admin = pw.new_context().new_page()
    sign_in(admin, base, keys["root"], tab="keys")
    wait_ready(admin, "keys")
    key_id = keys["bea"].split("_")[1]
    admin.click(f'button[data-revoke="{key_id}"]')
    admin.click(f'button[data-confirm="{key_id}"]')
    admin.wait_for_selector(f'tr[data-key-id="{key_id}"][data-status="revoked"]')
    assert "revoked" in admin.inner_text("#notice")
    bea.fill("#steps", "1")
    bea.click("#generate")  # her next action
    wait_ready(bea, "signin")
    assert notice(bea) == "Signed out: API key revoked"
    assert bea.evaluate("sessionStorage.length") == 0
    bea.reload()
    wait_ready(bea, "signin")
    status, out = post(base, "audit", keys["root"], {"contributor_id": "*"})
    assert any(r["action"] == "revoke_key" and r["details"]["key_id"] == key_id
               for r in out["records"])
    bea.context.close()
    admin.context.close()


# ------------------------------------------------------------ shared parts
def shot(server: dict, name: str) -> Path:
    server["shots"].mkdir(parents=True, exist_ok=True)
    return server["shots"] / f"console-{name}.png"
