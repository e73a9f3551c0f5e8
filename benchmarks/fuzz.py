"""Fuzz the HTTP API with schemathesis (every check) against a real `cdm serve` over
a copy of a store; prints the summary and writes the JSON report. It reports what it
found; the exit status is schemathesis's.

    .venv/bin/python benchmarks/fuzz.py --store var/store --max-examples 200

Every endpoint is fuzzed with an admin key except /value (a valid body starts a
valuation job that can run for hours; its inputs are checked by the same gate and
by tests/test_app.py). Server limits for the run: CDM_MAX_N=4 and CDM_MAX_STEPS=8
(the schema's bounds, so every schema-valid generate samples in under a second
instead of queueing hours of sampling), no per-key spend limit, and CDM_AUTH_FAILURES_PER_MINUTE high enough that the
fuzzer's own unauthenticated probes do not get its client rate limited.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "results" / "fuzz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(store: Path, workdir: Path, workers: int = 1):
    """A `cdm serve` over a copy of `store`; yields (port, admin key, store copy)."""
    root = workdir / "store"
    shutil.copytree(store, root, ignore=shutil.ignore_patterns("service.db*", "valuation"))
    key = subprocess.run([BIN / "cdm", "keys", "create", "--store", root, "--user", "fuzzer",
                          "--license", "all", "--admin"], capture_output=True, text=True,
                         check=True).stdout.strip()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true",
           "CDM_MAX_N": "4", "CDM_MAX_STEPS": "8", "CDM_KEY_COST_PER_MINUTE": "none",
           "CDM_AUTH_FAILURES_PER_MINUTE": "1000000", "CDM_DATA_ROOTS": str(workdir)}
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen([BIN / "cdm", "serve", "--store", root, "--port", str(port),
                             "--workers", str(workers)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cdm serve exited with {proc.returncode}; see {workdir}/serve.log")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("cdm serve did not become ready") from None
                time.sleep(0.5)
        yield port, key, root
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def fuzz(port: int, key: str, max_examples: int, seed: int, report: Path) -> tuple[int, str]:
    cmd = [str(BIN / "schemathesis"), "run", f"http://127.0.0.1:{port}/docs.json",
           "--checks", "all", "--max-examples", str(max_examples), "--seed", str(seed),
           "--exclude-path", "/value", "-H", f"Authorization: Bearer {key}",
           "--workers", "1", "--request-timeout", "120", "--no-color",
           "--report", "ndjson", "--report-ndjson-path", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, server(Path(args.store), Path(tmp)) as (port, key, _):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs.json", timeout=10) as r:
            (out / "openapi.json").write_bytes(r.read())
        code, text = fuzz(port, key, args.max_examples, args.seed, out / "events.ndjson")
        log = (Path(tmp) / "serve.log").read_text()
    seconds = time.perf_counter() - start
    tracebacks = log.count("Traceback (most recent call last)")
    lines = log.count("\n")
    (out / "output.txt").write_text(text)
    print(text[-6000:])
    summary = {"command": " ".join(sys.argv), "max_examples": args.max_examples,
               "seed": args.seed, "exit_code": code, "seconds": round(seconds, 1),
               "server_log_lines": lines, "server_log_tracebacks": tracebacks,
               "summary_tail": text[-3000:]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"schemathesis exit {code} in {seconds:.0f} s; server log: {lines} lines, "
          f"{tracebacks} tracebacks; {out}/summary.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
