"""Throughput of two hosts against one: two `cdm serve` processes (1 worker each) on
one PostgreSQL database (a throwaway cluster) and one store folder, each pinned to
one core with `taskset` (one torch thread each), as hosts of one core would be.

K client threads per host send generate {"n": N, "steps": S, "seed": i} back to back
for D seconds: K to host A ("one host"), then 2K, half to A and half to B ("two
hosts"), so that each host sees the same load (its batches as full) in both phases;
in alternation for R rounds on the same two servers (paired: this machine's speed
drifts over minutes). `--fixed-clients` sends K in both phases instead (the same
offered load spread over two hosts: each batches half as many requests). Prints images/s of each phase, the two-host / one-host ratio of each
round, and their mean and standard deviation; writes
benchmarks/results/hosts/load.json with the settings, load averages and the command
line. It never passes or fails on time (target of the multi-host issue: >= 1.8x).

Caveat, printed with the numbers: this machine has 2 cores, so the clients, the
database server and the hosts' request threads share the two cores the hosts are
pinned to; on separate machines the hosts would not compete with them.

    .venv/bin/python benchmarks/hosts_load.py --store var/store
    .venv/bin/python benchmarks/hosts_load.py --quick      # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from service import testing
from shards.settings import usable_cpus

RESULTS = Path(__file__).resolve().parent / "results" / "hosts"


# one worker (its torch threads follow the pinned core: one); no per-key limits
HOST_ENV = {"CDM_KEY_COST_PER_MINUTE": "none", "CDM_KEY_REQUESTS_PER_MINUTE": "none"}


def phase(urls: list[str], key: str, clients: int, seconds: float, body: dict) -> dict:
    """K clients for `seconds`, client i sending to urls[i % len(urls)]: images/s."""
    done, errors, stop = [], [], threading.Event()

    def client(i: int) -> None:
        url = urls[i % len(urls)]
        while not stop.is_set():
            status, out, _ = testing.post(url, "generate", key, {**body, "seed": i})
            (done if status == 200 else errors).append((time.monotonic(), status, out))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {"images_per_s": len(done) * body["n"] / elapsed, "requests": len(done),
            "errors": [e[1:] for e in errors[:3]], "error_count": len(errors),
            "seconds": elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="var/store")
    ap.add_argument("--clients", type=int, default=8, help="client threads per host")
    ap.add_argument("--fixed-clients", action="store_true",
                    help="the same clients in both phases (not per host)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds of 5 s")
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    args = ap.parse_args()
    # killed with SIGTERM: leave through the `finally`s (servers and cluster stopped)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.rounds, args.seconds, args.out = 2, 5.0, str(RESULTS / "load-quick.json")
    if shutil.which("taskset") is None or usable_cpus() < 2:
        print("needs taskset and 2 usable cores", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="cdm-hosts-"))
    cluster = testing.PostgresCluster()
    try:
        url = cluster.database()
        os.environ["CDM_DATABASE_URL"] = url
        root = work / "store"
        shutil.copytree(args.store, root, ignore=shutil.ignore_patterns("service.db*", ".*lock"))
        key = testing.cli_key(root, "bench", admin=True)
        body = {"n": args.n, "steps": args.steps}
        rows = []
        with testing.serving(root, work / "a.log", env=HOST_ENV, cpus="0") as a, \
                testing.serving(root, work / "b.log", env=HOST_ENV, cpus="1") as b:
            phase([a.url, b.url], key, 2 * args.clients, 5.0, body)  # warm-up
            for r in range(args.rounds):
                load = os.getloadavg()[0]
                one = phase([a.url], key, args.clients, args.seconds, body)
                two = phase([a.url, b.url], key, args.clients * (1 if args.fixed_clients else 2),
                            args.seconds, body)
                ratio = two["images_per_s"] / one["images_per_s"]
                rows.append({"round": r, "one_host": one, "two_hosts": two, "ratio": ratio,
                             "load_before": load, "load_after": os.getloadavg()[0]})
                print(f"round {r}: one host {one['images_per_s']:.2f} img/s, two hosts "
                      f"{two['images_per_s']:.2f} img/s, ratio {ratio:.2f} (errors "
                      f"{one['error_count']}, {two['error_count']})", flush=True)
        ratios = [row["ratio"] for row in rows]
        summary = {"ratio_mean": statistics.mean(ratios),
                   "ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}
        print(f"two hosts / one host: {summary['ratio_mean']:.2f} +- {summary['ratio_sd']:.2f} "
              f"over {len(ratios)} rounds (target >= 1.8); clients, PostgreSQL and the hosts "
              f"share this machine's {os.cpu_count()} cores")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(sys.argv), "settings": vars(args),
                                   "cpu_count": os.cpu_count(), "rounds": rows, **summary},
                                  indent=2) + "\n")
        print(f"wrote {out}; server logs in {work}")
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
