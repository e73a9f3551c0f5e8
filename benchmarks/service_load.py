"""Load behaviour of the service: throughput, head-of-line blocking, and a forget
under load with two workers. Prints tables and writes
benchmarks/results/service/load.json (load-quick.json with --quick) with the settings,
the machine's cpu count and the command line. It never passes or fails on time:
targets are printed as information; the exit status is 1 only when a part crashed.

1. throughput: the library's one-batch rate, `sampler.sample_batch([SampleRequest(None,
   n, seed) for seed in range(8)], steps)` in images/s after a warm-up, and the same 8
   requests sampled one at a time; both with `sample_batch`'s default routing (dense)
   and with the routing an HTTP generate request gets by default (top-k), since the
   HTTP numbers use the latter. Then a real `cdm serve` (1 worker,
   CDM_KEY_COST_PER_MINUTE=none) with K client threads sending generate requests
   {"n": n, "steps": steps, "seed": i} back to back, K = 1, 4, 8: images/s, p50/p95
   latency, mean requests per batch; once with batching (the default) and once with
   CDM_MAX_BATCH=1, on a separate server. Just before each batched row the library
   does the same work (3 rounds of one batch of K requests) in this process while
   the server idles, and the row's ratio is to that: paired, because this machine's
   speed drifts by up to 2x over minutes, which unpaired ratios mistake for server
   overhead. Targets: HTTP batched at K=8 / library one batch >= 0.7, and / the
   paired library >= 0.9; unbatched at K=4 and K=8 not slower than at K=1.
2. hol (head-of-line blocking), on a fresh 1-worker server: latency of a small request
   {"n": 1, "steps": 10} sent 20 times in a row on the idle server; then one
   maximum-cost request {"n": 64, "steps": 500} in a thread and, ~3 s later, the small
   request 20 times in a row while it runs. Target: loaded p95 < 2 x idle p95 + one
   big step (the big request's total / its steps).
3. workers: `cdm serve --workers 2`; 16 client threads send generate {"n": 1,
   "steps": 5} (licence: all) back to back; after ~10 s an admin forgets carol; the
   clients run ~20 s more. Counts requests sent after the acknowledgement that used
   carol (target 0), requests sent before the forget that did (contrast), statuses
   other than 200, requests per worker (target: both served after the ack), the purge
   job's status; after the server stops, the store copy must load and sample and
   carol's folders must be gone.

Every server runs on its own copy of the store in a temporary folder (the benchmark
forgets contributors); their logs go to a temporary folder whose path is printed and
kept. Every server started is killed (its whole process tree), also on errors.
--quick is a smoke test of the script, not a measurement: steps 5, one request per
client, 10 small requests per hol phase, hol's big request {"n": 16, "steps": 60}
with the small ones 0.5 s after it, workers 5 s before and 5 s after the forget.

Run it on an otherwise idle machine: the library and a 1-worker server use one torch
thread per core, and another busy process on the machine slows their steps by up to
10x at random (the load average at the start and end of each part is recorded).

    .venv/bin/python benchmarks/service_load.py --store var/store
    .venv/bin/python benchmarks/service_load.py --quick          # smoke test, minutes
    .venv/bin/python benchmarks/service_load.py --parts hol,workers
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402

from service import testing  # noqa: E402
from shards import ShardStore  # noqa: E402
from shards.routing import Routing  # noqa: E402
from shards.sampler import SampleRequest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "benchmarks" / "results" / "service"
PARTS = ("throughput", "hol", "workers")
CONCURRENCY = (1, 4, 8)
LIBRARY_REQUESTS = 8
SMALL = {"n": 1, "steps": 10}
BIG = {"n": 64, "steps": 500}
BIG_QUICK = {"n": 16, "steps": 60}
WORKER_BODY = {"n": 1, "steps": 5}
WORKER_CLIENTS = 16
FORGET = "carol"
NO_RATE_LIMIT = {"CDM_KEY_COST_PER_MINUTE": "none"}


# --------------------------------------------------------------------- HTTP
@dataclass
class Reply:
    """One HTTP request: status (0: no HTTP answer, see `error`), the JSON body
    without images (their count instead), the answering worker's pid, and
    `time.monotonic()` when it was sent and when the answer was read."""

    status: int
    body: dict
    worker: str | None
    sent: float
    done: float
    error: str | None = None
    retry_after: float | None = None  # seconds, from a 429's Retry-After

    @property
    def seconds(self) -> float:
        return self.done - self.sent


def post(url: str, endpoint: str, key: str, body: dict, timeout: float = 900.0) -> Reply:
    req = urllib.request.Request(f"{url}/{endpoint}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    sent, retry = time.monotonic(), None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, worker = r.status, r.read(), r.headers.get("x-cdm-worker")
    except urllib.error.HTTPError as err:
        status, payload, worker = err.code, err.read(), err.headers.get("x-cdm-worker")
        retry = err.headers.get("Retry-After")
    except (OSError, http.client.HTTPException) as err:
        return Reply(0, {}, None, sent, time.monotonic(), f"{type(err).__name__}: {err}")
    done = time.monotonic()
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = {"raw": payload[:200].decode(errors="replace")}
    if isinstance(parsed, dict):
        if isinstance(parsed.get("images"), list):
            parsed["images"] = len(parsed["images"])
        parsed.pop("attribution", None)
        parsed.pop("attribution_last", None)
    else:
        parsed = {"value": parsed}
    return Reply(status, parsed, worker, sent, done,
                 retry_after=float(retry) if status == 429 and retry else None)


@dataclass
class Server:
    """A running server of this benchmark: service.testing's, with its keys."""

    live: testing.Server
    keys: dict[str, str]

    def __getattr__(self, name):  # url, root, log, pid, startup_s, env
        return getattr(self.live, name)


@contextlib.contextmanager
def serving(source: Path, work: Path, logs: Path, name: str, workers: int = 1,
            env: dict[str, str] | None = None) -> Iterator[Server]:
    """A `cdm serve` over a fresh copy of `source` (no service.db: fresh keys and
    ledger), with a user key ("user", licence all) and an admin key ("admin").
    The server's process tree is killed on leaving, whatever happened."""
    root = work / name
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("service.db*"))
    keys = {"user": testing.cli_key(root, "bench"),
            "admin": testing.cli_key(root, "admin", admin=True)}
    log_path = logs / f"{name}.log"
    extra = dict(env or {})
    print(f"[{name}] starting cdm serve --workers {workers} "
          f"{' '.join(f'{k}={v}' for k, v in extra.items())} (log {log_path})", flush=True)
    with testing.serving(root, log_path, workers=workers, env=extra) as live:
        print(f"[{name}] ready at {live.url} after {live.startup_s:.1f} s", flush=True)
        yield Server(live, keys)


def log_summary(path: Path, limit: int = 8) -> dict:
    """Tracebacks, errors and warnings in a server log (first few distinct lines)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        return {"error": str(err)}
    flagged = [line for line in lines
               if "Traceback" in line or "ERROR" in line or "WARNING" in line
               or "Error:" in line or "Exception" in line]
    distinct: list[str] = []
    for line in flagged:
        short = line.strip()[:300]
        if short not in distinct:
            distinct.append(short)
    return {"log": str(path), "lines": len(lines),
            "tracebacks": sum("Traceback" in line for line in lines),
            "flagged_lines": len(flagged), "first_flagged": distinct[:limit]}


def batch_metric(server: Server) -> tuple[float, float]:
    """(sum, count) of the cdm_generate_batch_requests histogram, over all workers."""
    req = urllib.request.Request(f"{server.url}/metrics",
                                 headers={"Authorization": f"Bearer {server.keys['admin']}"})
    total = count = 0.0
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("cdm_generate_batch_requests_sum"):
                total += float(line.split()[-1])
            elif line.startswith("cdm_generate_batch_requests_count"):
                count += float(line.split()[-1])
    return total, count


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def statuses(replies: list[Reply]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(r.status for r in replies).items())}


def errors_seen(replies: list[Reply], limit: int = 5) -> list[str]:
    seen: list[str] = []
    for r in replies:
        if r.status != 200:
            text = r.error or str(r.body.get("error", r.body))[:200]
            text = f"{r.status}: {text}"
            if text not in seen:
                seen.append(text)
    return seen[:limit]


# --------------------------------------------------------------- throughput
def library_rates(sampler, n: int, steps: int) -> dict:
    reqs = [SampleRequest(None, n, seed) for seed in range(LIBRARY_REQUESTS)]
    rows = {}
    for label, routing in [("dense", None), ("http_default", Routing.parse(None, None, None))]:
        sampler.sample_batch(reqs, 2, routing=routing)  # warm-up: the shapes measured below
        sampler.sample_batch(reqs[:1], 2, routing=routing)
        t0 = time.perf_counter()
        sampler.sample_batch(reqs, steps, routing=routing)
        batch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in reqs:
            sampler.sample_batch([r], steps, routing=routing)
        one_s = time.perf_counter() - t0
        images = LIBRARY_REQUESTS * n
        rows[label] = {"routing": "dense" if routing is None else
                       {"kind": routing.kind, "top_k": routing.top_k, "mass": routing.mass},
                       "one_batch_images_per_s": images / batch_s, "one_batch_s": batch_s,
                       "one_at_a_time_images_per_s": images / one_s, "one_at_a_time_s": one_s}
    print(f"\nlibrary: {LIBRARY_REQUESTS} requests x {n} images, {steps} steps, "
          f"{len(sampler.classifier_ids)} shards")
    print(f"  {'routing':14s} {'one batch img/s':>16s} {'one at a time img/s':>20s}")
    for label, row in rows.items():
        print(f"  {label:14s} {row['one_batch_images_per_s']:16.2f} "
              f"{row['one_at_a_time_images_per_s']:20.2f}")
    return rows


def paired_library(sampler, n: int, steps: int):
    """The ideal server's rate for a row of K clients, measured now: `per_client`
    rounds of one library batch of K requests (the HTTP default routing), img/s. Run
    just before each HTTP row, so that the ratio does not depend on how fast this
    machine happens to be at the time (it drifts by up to 2x over minutes here)."""
    routing = Routing.parse(None, None, None)

    def rate(k: int, rounds: int) -> float:
        t0 = time.perf_counter()
        for r in range(rounds):
            sampler.sample_batch([SampleRequest(None, n, 1000 * r + i) for i in range(k)], steps,
                                 routing=routing)
        return rounds * k * n / (time.perf_counter() - t0)

    return rate


def http_rates(server: Server, name: str, n: int, steps: int, per_client: int,
               warmup: int, library=None) -> dict:
    """HTTP rows at each concurrency K; with `library` (`paired_library`), the
    library's rate for the same work measured just before each row, and the ratio."""
    key = server.keys["user"]

    def one(seed: int) -> Reply:
        return post(server.url, "generate", key, {"n": n, "steps": steps, "seed": seed})

    with ThreadPoolExecutor(max(CONCURRENCY)) as pool:  # torch's first calls, not measured
        warm = list(pool.map(lambda s: post(server.url, "generate", key,
                                            {"n": n, "steps": 2, "seed": s}), range(warmup)))
    rows: dict[str, dict] = {"warmup_statuses": statuses(warm)}
    for k in CONCURRENCY:
        total = k * per_client
        lib = library(k, per_client) if library else None
        before = batch_metric(server)
        t0 = time.monotonic()
        with ThreadPoolExecutor(k) as pool:
            replies = list(pool.map(one, range(total)))
        wall = time.monotonic() - t0
        after = batch_metric(server)
        ok = [r for r in replies if r.status == 200]
        lat = [r.seconds for r in ok]
        batches = after[1] - before[1]
        rows[str(k)] = {
            "clients": k, "requests": total, "ok": len(ok), "statuses": statuses(replies),
            "errors": errors_seen(replies), "wall_s": wall,
            "images_per_s": len(ok) * n / wall, "latency_p50_s": pct(lat, 50),
            "latency_p95_s": pct(lat, 95),
            "mean_requests_per_batch": (after[0] - before[0]) / batches if batches else None,
            "workers": sorted({r.worker for r in replies if r.worker}),
            "library_same_work_images_per_s": lib,
            "over_library_same_work": len(ok) * n / wall / lib if lib else None}
    print(f"\nHTTP {name}: n={n}, steps={steps}, {per_client} requests per client"
          + ("; lib: the library's batches of K requests just before the row" if library else ""))
    print(f"  {'K':>3s} {'img/s':>8s} {'p50 s':>8s} {'p95 s':>8s} {'req/batch':>10s} "
          f"{'ok':>5s} {'lib img/s':>10s} {'/lib':>6s}  statuses")
    for k in CONCURRENCY:
        r = rows[str(k)]
        print(f"  {k:3d} {r['images_per_s']:8.2f} {fmt(r['latency_p50_s']):>8s} "
              f"{fmt(r['latency_p95_s']):>8s} {fmt(r['mean_requests_per_batch']):>10s} "
              f"{r['ok']:5d} {fmt(r['library_same_work_images_per_s']):>10s} "
              f"{fmt(r['over_library_same_work'], '.3f'):>6s}  {r['statuses']}")
    return rows


def part_throughput(args: argparse.Namespace, source: Path, work: Path, logs: Path) -> dict:
    lib_root = work / "library"
    shutil.copytree(source, lib_root, ignore=shutil.ignore_patterns("service.db*"))
    sampler = ShardStore.open(lib_root).load_sampler("cpu")
    report: dict = {"library": library_rates(sampler, args.n, args.steps)}
    for name, env in [("batched", {}), ("unbatched", {"CDM_MAX_BATCH": "1"})]:
        with serving(source, work, logs, f"throughput-{name}", env={**NO_RATE_LIMIT, **env}) as s:
            rows = http_rates(s, name, args.n, args.steps, args.requests_per_client, args.warmup,
                              paired_library(sampler, args.n, args.steps)
                              if name == "batched" else None)
        report[f"http_{name}"] = {"env": s.env, "startup_s": s.startup_s, "rows": rows,
                                  "log": log_summary(s.log)}
    batched8 = report["http_batched"]["rows"]["8"]["images_per_s"]
    unb = report["http_unbatched"]["rows"]
    targets = {}
    for label, lib in report["library"].items():
        ratio = batched8 / lib["one_batch_images_per_s"]
        targets[f"http_batched_k8_over_library_one_batch_{label}"] = {
            "ratio": ratio, "target": ">= 0.7", "met": ratio >= 0.7}
    for k in CONCURRENCY:
        ratio = report["http_batched"]["rows"][str(k)]["over_library_same_work"]
        targets[f"http_batched_k{k}_over_library_same_work_paired"] = {
            "ratio": ratio, "target": ">= 0.9", "met": ratio is not None and ratio >= 0.9}
    for k in (4, 8):
        ratio = unb[str(k)]["images_per_s"] / unb["1"]["images_per_s"] \
            if unb["1"]["images_per_s"] else None
        targets[f"http_unbatched_k{k}_over_k1"] = {
            "ratio": ratio, "target": ">= 1.0 (not slower)",
            "met": ratio is not None and ratio >= 1.0}
    report["targets"] = targets
    print("\nthroughput targets (information only)")
    for name, t in targets.items():
        print(f"  {name:52s} {fmt(t['ratio'], '.3f'):>7s}  target {t['target']:20s} "
              f"{'met' if t['met'] else 'NOT met'}")
    return report


# --------------------------------------------------------------------- hol
def part_hol(args: argparse.Namespace, source: Path, work: Path, logs: Path) -> dict:
    big = BIG_QUICK if args.quick else BIG
    repeats = args.hol_requests
    with serving(source, work, logs, "hol", env=NO_RATE_LIMIT) as s:
        key = s.keys["user"]

        def small(seed: int) -> Reply:
            return post(s.url, "generate", key, {**SMALL, "seed": seed})

        warm = [small(1000 + i) for i in range(3)]
        idle = [small(i) for i in range(repeats)]
        holder: dict[str, Reply] = {}
        big_thread = threading.Thread(target=lambda: holder.update(
            big=post(s.url, "generate", key, {**big, "seed": 7})), daemon=True)
        big_thread.start()
        time.sleep(args.hol_wait)
        loaded = [small(repeats + i) for i in range(repeats)]
        big_thread.join()
        big_reply = holder["big"]
    idle_ok = [r.seconds for r in idle if r.status == 200]
    loaded_ok = [r.seconds for r in loaded if r.status == 200]
    overlapped = [r for r in loaded if r.done <= big_reply.done]
    big_step = big_reply.seconds / big["steps"]
    idle_p95, loaded_p95 = pct(idle_ok, 95), pct(loaded_ok, 95)
    bound = None if idle_p95 is None else 2 * idle_p95 + big_step
    report = {
        "small": SMALL, "big": big, "requests": repeats, "wait_before_loaded_s": args.hol_wait,
        "warmup_statuses": statuses(warm),
        "idle": {"p50_s": pct(idle_ok, 50), "p95_s": idle_p95, "max_s": max(idle_ok, default=None),
                 "statuses": statuses(idle), "errors": errors_seen(idle)},
        "loaded": {"p50_s": pct(loaded_ok, 50), "p95_s": loaded_p95,
                   "max_s": max(loaded_ok, default=None), "statuses": statuses(loaded),
                   "errors": errors_seen(loaded),
                   "finished_while_big_ran": len(overlapped)},
        "big_request": {"status": big_reply.status, "total_s": big_reply.seconds,
                        "per_step_s": big_step, "error": big_reply.error
                        or (big_reply.body.get("error") if big_reply.status != 200 else None)},
        "small_per_step_s": None if not idle_ok else pct(idle_ok, 50) / SMALL["steps"],
        "target": {"rule": "loaded p95 < 2 x idle p95 + one big step", "bound_s": bound,
                   "met": bound is not None and loaded_p95 is not None and loaded_p95 < bound},
        "startup_s": s.startup_s, "log": log_summary(s.log)}
    print(f"\nhead-of-line: small {SMALL}, big {big}, {repeats} small requests each")
    print(f"  {'':8s} {'p50 s':>8s} {'p95 s':>8s} {'max s':>8s}  statuses")
    for name in ("idle", "loaded"):
        r = report[name]
        print(f"  {name:8s} {fmt(r['p50_s'], '.3f'):>8s} {fmt(r['p95_s'], '.3f'):>8s} "
              f"{fmt(r['max_s'], '.3f'):>8s}  {r['statuses']}")
    print(f"  big request: status {big_reply.status}, {big_reply.seconds:.1f} s total, "
          f"{big_step:.3f} s per step; small request {fmt(report['small_per_step_s'], '.3f')} "
          f"s per step (idle p50 / {SMALL['steps']})")
    print(f"  loaded small requests finished while the big one ran: {len(overlapped)}/{repeats}")
    t = report["target"]
    print(f"  target (information only): {t['rule']}: {fmt(loaded_p95, '.3f')} < "
          f"{fmt(bound, '.3f')} s -> {'met' if t['met'] else 'NOT met'}")
    return report


# ----------------------------------------------------------------- workers
def part_workers(args: argparse.Namespace, source: Path, work: Path, logs: Path) -> dict:
    before_s, after_s = (5.0, 5.0) if args.quick else (10.0, 20.0)
    replies: list[Reply] = []
    with serving(source, work, logs, "workers", workers=2, env=NO_RATE_LIMIT) as s:
        key, admin = s.keys["user"], s.keys["admin"]
        warm_workers: set[str] = set()  # both workers loaded before measuring
        warm: list[Reply] = []
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(8) as pool:
            while len(warm_workers) < 2 and time.monotonic() < deadline:
                batch = list(pool.map(lambda i: post(s.url, "generate", key,
                                                     {**WORKER_BODY, "seed": i}), range(8)))
                warm += batch
                warm_workers |= {r.worker for r in batch if r.status == 200 and r.worker}
        stop = threading.Event()

        def client(i: int) -> None:
            j = 0
            while not stop.is_set():
                r = post(s.url, "generate", key, {**WORKER_BODY, "seed": i * 1_000_000 + j})
                replies.append(r)
                j += 1
                if r.status == 0:
                    time.sleep(0.1)  # no busy loop against a server that is gone

        threads = [threading.Thread(target=client, args=(i,), daemon=True)
                   for i in range(WORKER_CLIENTS)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(before_s)
        forget = post(s.url, "forget", admin, {"contributor_id": FORGET})
        t_forget_sent, t_ack = forget.sent, forget.done
        time.sleep(after_s)
        stop.set()
        for t in threads:
            t.join(timeout=300)
        t_end = time.monotonic()
        job: dict = {}
        job_wait_s = None
        if forget.status == 200:
            job_deadline = time.monotonic() + args.purge_timeout
            while time.monotonic() < job_deadline:
                job = post(s.url, "job", admin, {"job_id": forget.body["job_id"]}).body
                if job.get("status") in ("succeeded", "failed"):
                    break
                time.sleep(0.2)
            job_wait_s = time.monotonic() - t_ack
    # the server is stopped: the store copy must load and carol's files must be gone
    after_stop: dict = {}
    try:
        store = ShardStore.open(s.root)
        out = store.load_sampler("cpu")(None, n=1, steps=2, seed=0)
        after_stop = {"loadable": True, "sample_shape": list(out.images.shape),
                      "contributors": store.contributor_ids,
                      "pending_purges": list(store.pending_purges)}
    except Exception as err:  # reported, not raised: the count below still matters
        after_stop = {"loadable": False, "error": f"{type(err).__name__}: {err}"}
    left = [p for p in (f"shards/{FORGET}", f"router/{FORGET}", f"data/{FORGET}",
                        f"shards/.{FORGET}.partial", f"router/.{FORGET}.partial",
                        f"data/.{FORGET}.partial") if (s.root / p).exists()]
    after_stop["carol_folders_left"] = left

    def used(r: Reply) -> bool:
        return r.status == 200 and FORGET in (r.body.get("contributors") or [])

    ok = [r for r in replies if r.status == 200]
    after_ack = [r for r in replies if r.sent > t_ack]
    before = [r for r in replies if r.sent < t_forget_sent]
    window = [r for r in replies if t_forget_sent <= r.sent <= t_ack]
    per_worker = {"all": dict(Counter(r.worker for r in ok)),
                  "before_forget": dict(Counter(r.worker for r in before if r.status == 200)),
                  "after_ack": dict(Counter(r.worker for r in after_ack if r.status == 200))}
    lat = [r.seconds for r in ok]

    def latency(rows: list[Reply]) -> dict:
        values = [r.seconds for r in rows if r.status == 200]
        return {"p50_s": pct(values, 50), "p95_s": pct(values, 95),
                "max_s": max(values, default=None)}

    report = {
        "body": WORKER_BODY, "clients": WORKER_CLIENTS, "run_before_forget_s": before_s,
        "run_after_ack_s": after_s, "startup_s": s.startup_s,
        "warmup": {"requests": len(warm), "workers_seen": sorted(warm_workers),
                   "statuses": statuses(warm)},
        "requests": len(replies), "ok": len(ok), "wall_s": t_end - t_start,
        "requests_per_s": len(ok) / (t_end - t_start),
        "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
        "latency_before_forget": latency(before), "latency_after_ack": latency(after_ack),
        "statuses": statuses(replies), "non_200": len(replies) - len(ok),
        "errors": errors_seen(replies),
        "forget": {"status": forget.status, "body": forget.body, "worker": forget.worker,
                   "error": forget.error, "seconds": forget.seconds,
                   "sent_at_s": t_forget_sent - t_start, "ack_at_s": t_ack - t_start},
        "sent_after_ack": len(after_ack),
        "sent_after_ack_with_carol": sum(used(r) for r in after_ack),
        "sent_before_forget": len(before),
        "sent_before_forget_with_carol": sum(used(r) for r in before),
        "sent_during_forget": len(window),
        "sent_during_forget_with_carol": sum(used(r) for r in window),
        "per_worker": per_worker,
        "purge_job": {"status": job.get("status"), "error": job.get("error"),
                      "seconds_after_ack": job_wait_s,
                      "result_keys": sorted((job.get("result") or {}).keys())},
        "after_stop": after_stop,
        "targets": {
            "no_carol_after_ack": sum(used(r) for r in after_ack) == 0,
            "both_workers_after_ack": len(per_worker["after_ack"]) >= 2,
            "all_200": len(replies) == len(ok),
            "purge_succeeded": job.get("status") == "succeeded",
            "store_loadable": bool(after_stop.get("loadable")),
            "carol_folders_gone": not left},
        "log": log_summary(s.log)}
    print(f"\nworkers: 2 workers, {WORKER_CLIENTS} clients sending {WORKER_BODY}; forget "
          f"{FORGET!r} after {before_s:.0f} s, {after_s:.0f} s more after the ack")
    print(f"  requests {len(replies)} ({report['requests_per_s']:.1f} ok/s, p50 "
          f"{fmt(report['latency_p50_s'], '.3f')} s, p95 {fmt(report['latency_p95_s'], '.3f')} s),"
          f" statuses {report['statuses']}")
    print(f"  forget: status {forget.status}, acknowledged in {forget.seconds:.3f} s "
          f"by worker {forget.worker}")
    print(f"  {'sent':22s} {'requests':>9s} {'with carol':>11s} {'p50 s':>8s} {'p95 s':>8s} "
          f"{'max s':>8s}")
    for label, rows in [("before the forget", before), ("during the forget", window),
                        ("after the ack", after_ack)]:
        lr = latency(rows)
        print(f"  {label:22s} {len(rows):9d} {sum(used(r) for r in rows):11d} "
              f"{fmt(lr['p50_s'], '.3f'):>8s} {fmt(lr['p95_s'], '.3f'):>8s} "
              f"{fmt(lr['max_s'], '.3f'):>8s}")
    print(f"  per worker (200s): before {per_worker['before_forget']}, "
          f"after ack {per_worker['after_ack']}")
    print(f"  purge job: {job.get('status')} ({fmt(job_wait_s, '.1f')} s after the ack)"
          f"{' error ' + str(job.get('error')) if job.get('error') else ''}")
    print(f"  after stop: loadable {after_stop.get('loadable')}, contributors "
          f"{after_stop.get('contributors')}, carol folders left {left}")
    print("  targets (information only): " + ", ".join(
        f"{k} {'met' if v else 'NOT met'}" for k, v in report["targets"].items()))
    return report


# -------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--n", type=int, default=4, help="throughput: images per request")
    parser.add_argument("--steps", type=int, default=None,
                        help="throughput: steps per request (default 50; --quick 5)")
    parser.add_argument("--requests-per-client", type=int, default=None,
                        help="throughput: requests per client thread (default 3; --quick 1)")
    parser.add_argument("--warmup", type=int, default=8,
                        help="throughput: unmeasured requests (2 steps) per server first")
    parser.add_argument("--hol-requests", type=int, default=None,
                        help="hol: small requests per phase (default 20; --quick 10)")
    parser.add_argument("--hol-wait", type=float, default=None,
                        help="hol: seconds between starting the big request and the small "
                             "ones (default 3; --quick 0.5, as its big request is short)")
    parser.add_argument("--purge-timeout", type=float, default=300.0,
                        help="workers: seconds to wait for the purge job")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: steps 5, fewer requests, hol big request "
                             f"{BIG_QUICK}, workers 5 s + 5 s")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/service/load.json; "
                             "--quick: load-quick.json)")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 5 if args.quick else 50
    if args.requests_per_client is None:
        args.requests_per_client = 1 if args.quick else 3
    if args.hol_requests is None:
        args.hol_requests = 10 if args.quick else 20
    if args.hol_wait is None:
        args.hol_wait = 0.5 if args.quick else 3.0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"--parts {args.parts!r}: unknown {unknown}; allowed: {', '.join(PARTS)}")
    source = Path(args.store).resolve()
    if not (source / "manifest.json").is_file():
        print(f"store {args.store} does not exist (no manifest.json there); build it first "
              "(see docs/evidence.md); nothing was measured")
        return 1
    contributors = ShardStore.open(source).contributor_ids
    if "workers" in parts and FORGET not in contributors:
        print(f"store {args.store} has no live contributor {FORGET!r} (live: {contributors}); "
              "the workers part forgets it; nothing was measured")
        return 1
    out = Path(args.out) if args.out else RESULTS / ("load-quick.json" if args.quick
                                                     else "load.json")
    import torch

    logs = Path(tempfile.mkdtemp(prefix="cdm-load-logs-"))
    work = Path(tempfile.mkdtemp(prefix="cdm-load-work-"))
    command = [Path(sys.executable).name, *sys.argv]
    print(f"command: {' '.join(command)}")
    print(f"store {source}: {len(contributors)} contributors; cpus {os.cpu_count()}, "
          f"torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; quick={args.quick}")
    print(f"server logs: {logs}", flush=True)
    report: dict = {
        "command": command, "cwd": os.getcwd(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg(),
        "settings": {"store": str(source), "contributors": contributors, "parts": parts,
                     "quick": args.quick, "n": args.n, "steps": args.steps,
                     "requests_per_client": args.requests_per_client,
                     "concurrency": list(CONCURRENCY), "library_requests": LIBRARY_REQUESTS,
                     "warmup": args.warmup, "hol_small": SMALL,
                     "hol_big": BIG_QUICK if args.quick else BIG,
                     "hol_requests": args.hol_requests, "hol_wait_s": args.hol_wait,
                     "workers_body": WORKER_BODY, "workers_clients": WORKER_CLIENTS,
                     "forget": FORGET, "server_env": NO_RATE_LIMIT},
        "logs": str(logs), "parts": {}}
    runners = {"throughput": part_throughput, "hol": part_hol, "workers": part_workers}
    failed = []
    t_all = time.monotonic()
    try:
        for part in parts:
            t0 = time.monotonic()
            load = os.getloadavg()
            print(f"\n=== {part} === (load average {load[0]:.2f})", flush=True)
            try:
                report["parts"][part] = runners[part](args, source, work, logs)
            except Exception as err:  # the other parts still run; the JSON says what failed
                traceback.print_exc()
                report["parts"][part] = {"error": f"{type(err).__name__}: {err}",
                                         "traceback": traceback.format_exc()}
                failed.append(part)
            report["parts"][part]["part_seconds"] = time.monotonic() - t0
            report["parts"][part]["load_average_start"] = load
            report["parts"][part]["load_average_end"] = os.getloadavg()
            print(f"[{part}] {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.monotonic() - t_all
    report["load_average_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({report['seconds']:.0f} s in all); server logs kept in {logs}")
    if failed:
        print(f"parts that crashed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
