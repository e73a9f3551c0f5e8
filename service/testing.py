"""Helpers for tests and benchmarks that run a real `cdm serve` (as diffusers keeps
its testing utilities in the package): start one on a free loopback port, wait until
it is ready, talk to it, and kill its whole process tree on the way out.

Nothing here is used by the service itself. `kill_tree` needs psutil (the dev extra).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shards.settings import OFFLINE_ENV

CDM = str(Path(sys.executable).with_name("cdm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int, sig_timeout: float = 20.0) -> None:
    """Stop a process and every process it started (BentoML's workers leave its group)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [*parent.children(recursive=True), parent]  # enumerate before anything dies
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=sig_timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def cli_key(root: Path, user: str, license: str = "all", admin: bool = False,
            contributor: str | None = None) -> str:
    """A new API key for the store at `root`, made by `cdm keys create`: a user key
    licensed for `license`, an admin key, or a key acting for `contributor`."""
    args = [CDM, "keys", "create", "--store", str(root), "--user", user]
    args += ["--contributor", contributor] if contributor else ["--license", license]
    out = subprocess.run(args + (["--admin"] if admin else []), capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def post(url: str, endpoint: str, key: str, body: dict | None = None,
         timeout: float = 120.0) -> tuple[int, dict, str | None]:
    """POST JSON to `url/endpoint` with a bearer key: (status, JSON body, the answering
    worker's pid from `x-cdm-worker`). HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(f"{url}/{endpoint}", data=json.dumps(body or {}).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers.get("x-cdm-worker")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers.get("x-cdm-worker")


@dataclass
class Server:
    """A running `cdm serve`: its base URL, store, log file and process."""

    url: str
    port: int
    root: Path
    log: Path
    proc: subprocess.Popen
    startup_s: float
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until GET /readyz answers 200; raises (with the log's tail) if the server exits
    or is not ready within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cdm serve exited with {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"cdm serve not ready after {timeout:.0f} s; see {log}")


@contextlib.contextmanager
def serving(root: Path, log: Path, workers: int = 1, env: dict[str, str] | None = None,
            timeout: float = 300.0, cpus: str | None = None) -> Iterator[Server]:
    """`cdm serve --store root` on a free loopback port, its output in `log`, pinned
    to `cpus` (taskset's list, e.g. "0") when given; the process tree is killed on
    leaving, whatever happened. BentoML's home is a folder beside `log` (unless `env`
    names one), so test servers leave nothing in the user's cache."""
    port, extra = free_port(), dict(env or {})
    extra.setdefault("BENTOML_HOME", str(Path(log).parent / f"bentoml-{port}"))
    url = f"http://127.0.0.1:{port}"
    pin = ["taskset", "-c", cpus] if cpus is not None else []
    with open(log, "w") as out:
        start = time.monotonic()
        proc = subprocess.Popen([*pin, CDM, "serve", "--store", str(root), "--port", str(port),
                                 "--workers", str(workers)],
                                env={**os.environ, **OFFLINE_ENV, **extra}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(url, proc, Path(log), timeout)
            yield Server(url, port, Path(root), Path(log), proc, time.monotonic() - start, extra)
        finally:
            kill_tree(proc.pid)


# ------------------------------------------------- a throwaway PostgreSQL server
# For the tests and benchmarks that run the records on PostgreSQL: initdb in a
# temporary folder, the server on a free loopback port with password authentication.
# Debian's server binaries (`make postgres` installs them). Not pytest-postgresql: its
# executor runs initdb as the current user, and initdb refuses to run as root, which
# CI is here; as root the cluster runs as the `postgres` user the package creates.
PG_USER, PG_PASSWORD = "cdm", "cdm-test-password"


def postgres_bin() -> Path:
    """The folder of initdb/pg_ctl: the newest of Debian's, else whatever PATH has."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    if not initdb:
        raise RuntimeError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed; "
                           "`make postgres` installs Debian's package")
    return Path(initdb).parent


class PostgresCluster:
    """One server; `database()` makes a fresh, empty database on it and returns its URL."""

    def __init__(self):
        self.bin = postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="cdm-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        pwfile = self.dir / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.as_postgres:
            for path in (self.dir, pwfile):
                shutil.chown(path, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", PG_USER, "--pwfile", str(pwfile),
                  "-A", "scram-sha-256", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.dir)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
                   "-c fsync=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres", password: str = PG_PASSWORD) -> str:
        return f"postgresql://{PG_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop a database `database()` made, closing whatever is still connected."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------- the console in a browser
CONSOLE_TABS = {"user": ["generate", "usage"], "contributor": ["mine"],
                "admin": ["contributors", "jobs", "audit", "keys", "valuation", "generate"]}


def chromium_path() -> str | None:
    """The system Chromium (Debian's package); Playwright never downloads a browser."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright):
    """Headless system Chromium through Playwright."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-gpu"])


def sign_in(page, base: str, key: str, tab: str | None = None, refused: bool = False) -> None:
    """Paste `key` into the console's sign-in form (on `tab`), wait for the result."""
    page.goto(f"{base}/ui/" + (f"#{tab}" if tab else ""))
    page.wait_for_selector('body[data-ready="signin"]')
    page.fill("#key", key)
    page.evaluate("delete document.body.dataset.ready")
    page.click("#signin button[type=submit]")
    page.wait_for_selector('body[data-ready="signin"]' if refused else
                           'body[data-ready]:not([data-ready="signin"])')


def page_ready(page, tab: str, timeout: float = 30_000) -> None:
    """Until the console says `tab` shows its data."""
    page.wait_for_selector(f'body[data-ready="{tab}"]', timeout=timeout)


def load_ms(page, base: str, tab: str) -> float:
    """A full load of one page (HTML, script, style, the key's role and the page's
    data), from navigation start to the page showing its data, in ms."""
    page.goto(f"{base}/ui/#{tab}")
    page.reload()
    page_ready(page, tab)
    return float(page.evaluate("window.cdmReadyAt"))


def measure_loads(browser, base: str, keys: dict[str, str], repeats: int = 3) -> dict[str, float]:
    """Median ms from navigation start to each role's page showing its data."""
    import statistics

    out = {}
    for role, key in keys.items():
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        sign_in(page, base, key)
        for tab in CONSOLE_TABS[role]:
            out[f"{role}/{tab}"] = round(statistics.median(
                load_ms(page, base, tab) for _ in range(repeats)), 1)
        context.close()
    return out
