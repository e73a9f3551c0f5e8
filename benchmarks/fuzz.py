"""Fuzz the HTTP API with schemathesis (every check) against a real `cdm serve` over
a copy of a store; prints the summary and writes the JSON report. It reports what it
found; the exit status is schemathesis's.

    .venv/bin/python benchmarks/fuzz.py --store var/store --max-examples 200

Every endpoint is fuzzed once per role: with no key, a user key (licence: all), a
contributor key (the store's first contributor) and an admin key, in that order (the
admin's run may forget contributors), except /value (a valid body starts a valuation
job that can run for hours; its inputs are checked by the same gate and by
tests/test_app.py). The exit status is 0 only when every role's run found nothing. Server limits for the run: CDM_MAX_N=4 and CDM_MAX_STEPS=8
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

from service import testing
from shards import ShardStore

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "results" / "fuzz"


def fuzz_env(work: Path) -> dict[str, str]:
    """The server's limits for a fuzzing run (see the module docstring)."""
    return {"CDM_MAX_N": "4", "CDM_MAX_STEPS": "8", "CDM_KEY_COST_PER_MINUTE": "none",
            "CDM_AUTH_FAILURES_PER_MINUTE": "1000000", "CDM_DATA_ROOTS": str(work)}


ROLES = ("none", "user", "contributor", "admin")  # the admin's run last: it may forget


def fuzz(url: str, key: str | None, max_examples: int, seed: int, report: Path) -> tuple[int, str]:
    """One schemathesis run with `key` (None: no Authorization header)."""
    cmd = [str(BIN / "schemathesis"), "run", f"{url}/docs.json",
           "--checks", "all", "--max-examples", str(max_examples), "--seed", str(seed),
           "--exclude-path", "/value", "--workers", "1", "--request-timeout", "120",
           "--no-color", "--report", "ndjson", "--report-ndjson-path", str(report)]
    if key is not None:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--roles", default=",".join(ROLES),
                        help=f"comma-separated, run in this order (default {','.join(ROLES)})")
    args = parser.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    if not roles or set(roles) - set(ROLES):
        parser.error(f"--roles: choose from {', '.join(ROLES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs, texts = {}, []
    with tempfile.TemporaryDirectory() as tmp, \
            serving(Path(args.store), Path(tmp), Path(tmp), "fuzz", env=fuzz_env(Path(tmp))) as s:
        with urllib.request.urlopen(f"{s.url}/docs.json", timeout=10) as r:
            (out / "openapi.json").write_bytes(r.read())
        first = ShardStore.open(s.root).contributor_ids[0]
        keys = {"none": None, "user": s.keys["user"], "admin": s.keys["admin"],
                "contributor": testing.cli_key(s.root, first, contributor=first)}
        for role in roles:
            t0 = time.perf_counter()
            code, text = fuzz(s.url, keys[role], args.max_examples, args.seed,
                              out / f"events-{role}.ndjson")
            runs[role] = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1),
                          "summary_tail": text[-1500:]}
            texts.append(f"===== role: {role} (exit {code})\n{text}")
            print(f"[fuzz] role {role}: schemathesis exit {code}", flush=True)
        log = s.log.read_text()
    seconds = time.perf_counter() - start
    tracebacks = log.count("Traceback (most recent call last)")
    lines = log.count("\n")
    text = "\n".join(texts)
    (out / "output.txt").write_text(text)
    print(text[-6000:])
    code = max((r["exit_code"] for r in runs.values()), default=0)
    summary = {"command": " ".join(sys.argv), "max_examples": args.max_examples,
               "seed": args.seed, "exit_code": code, "roles": runs, "seconds": round(seconds, 1),
               "server_log_lines": lines, "server_log_tracebacks": tracebacks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"schemathesis exit {code} over roles {', '.join(roles)} in {seconds:.0f} s; "
          f"server log: {lines} lines, {tracebacks} tracebacks; {out}/summary.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
