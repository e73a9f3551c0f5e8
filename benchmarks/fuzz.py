"""Fuzz the HTTP API with schemathesis (every check) against a real `cdm serve` over
a copy of a store; prints the summary and writes the JSON report. It reports what it
found; the exit status is schemathesis's.

    .venv/bin/python benchmarks/fuzz.py --store var/store --max-examples 200

Every endpoint is fuzzed with an admin key except /value (a valid body starts a
valuation job that can run for hours; its inputs are checked by the same gate and
by tests/test_app.py). Server limits for the run: CDM_MAX_N=4 and CDM_MAX_STEPS=8
(the schema's bounds, so every schema-valid generate samples in under a second
instead of queueing hours of sampling), no per-key spend limit, and
CDM_AUTH_FAILURES_PER_MINUTE high enough that the fuzzer's own unauthenticated probes
do not get its client rate limited. The server is `service_load.serving`'s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from service_load import serving  # the benchmarks' one way to run a server

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "results" / "fuzz"


def fuzz_env(work: Path) -> dict[str, str]:
    """The server's limits for a fuzzing run (see the module docstring)."""
    return {"CDM_MAX_N": "4", "CDM_MAX_STEPS": "8", "CDM_KEY_COST_PER_MINUTE": "none",
            "CDM_AUTH_FAILURES_PER_MINUTE": "1000000", "CDM_DATA_ROOTS": str(work)}


def fuzz(url: str, key: str, max_examples: int, seed: int, report: Path) -> tuple[int, str]:
    cmd = [str(BIN / "schemathesis"), "run", f"{url}/docs.json",
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
    with tempfile.TemporaryDirectory() as tmp, \
            serving(Path(args.store), Path(tmp), Path(tmp), "fuzz", env=fuzz_env(Path(tmp))) as s:
        with urllib.request.urlopen(f"{s.url}/docs.json", timeout=10) as r:
            (out / "openapi.json").write_bytes(r.read())
        code, text = fuzz(s.url, s.keys["admin"], args.max_examples, args.seed, out / "events.ndjson")
        log = s.log.read_text()
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
