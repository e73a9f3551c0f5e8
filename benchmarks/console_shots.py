"""The web console's screenshots (docs/console-*.png) and page-load times, against a
copy of a store (the default one; the store itself is not changed, fresh keys):

    .venv/bin/python benchmarks/console_shots.py --store var/store --shots docs

Prints the median load of each role's pages (ms from navigation start to the page
showing its data) in headless Chromium, the system package (`make console-shots`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from service.auth import create_key
from service.db import DB_FILE, Database
from service.testing import chromium_path, launch, measure_loads, page_ready, serving, sign_in
from shards import ShardStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--shots", default="docs", help="where console-<role>.png go")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    if chromium_path() is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        shutil.copytree(args.store, root)
        ids = ShardStore.open(root).contributor_ids
        db = Database(root / DB_FILE)
        keys = {"user": create_key(db, "customer", ids[: (len(ids) + 1) // 2]),
                "contributor": create_key(db, ids[0], None, role="contributor",
                                          contributor_id=ids[0]),
                "admin": create_key(db, "admin", None, role="admin")}
        with serving(root, Path(tmp) / "serve.log") as server, sync_playwright() as p:
            base = server.url
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            sign_in(page, base, keys["user"])  # warm: the first key check, the sampler
            page.fill("#n", "8")
            page.click("#generate")
            page.wait_for_selector("#gallery figure.sample >> nth=7", timeout=300_000)
            page.screenshot(path=str(shots / "console-user.png"), full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})
            page.screenshot(path=str(shots / "console-phone.png"), full_page=True)
            times = measure_loads(browser, base, keys, repeats=args.repeats)
            for role, tab in (("contributor", "mine"), ("admin", "contributors"),
                              ("admin", "valuation")):
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                sign_in(page, base, keys[role], tab=tab)
                page_ready(page, tab)
                name = role if tab in ("mine", "contributors") else f"{role}-{tab}"
                page.screenshot(path=str(shots / f"console-{name}.png"), full_page=True)
            browser.close()
    print("page | median load (ms)\n---|---")
    for page_name, ms in times.items():
        print(f"{page_name} | {ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
