"""Generate throughput of the service on the default store. Prints measured numbers
and writes benchmarks/results/<store>/throughput.json; it does not pass or fail.

1. Library: K concurrent requests of n images each, sampled one request at a time
   vs in one batch (`ComposedSampler.sample_batch`, what adaptive batching would
   run), for K = 1, 4, 8.
2. HTTP: a real `cdm serve` on loopback (adaptive batching on), K client threads
   each sending generate requests back to back (concurrency 1, 4, 8): images/s,
   latency percentiles, and the mean number of requests per batch so far; once with
   adaptive batching (CDM_MAX_BATCH=8) and once without (CDM_MAX_BATCH=1). BentoML's
   dispatcher runs its first ~20 requests one at a time to fit its latency model, so
   `--warmup` requests go first and are not measured.

    python benchmarks/service_throughput.py --store var/store
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.sampler import SampleRequest  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def library(store: ShardStore, n: int, steps: int, concurrency: list[int]) -> dict:
    sampler = store.load_sampler("cpu")
    sampler(None, n=n, steps=2, seed=0)  # warm-up
    rows = {}
    for k in concurrency:
        reqs = [SampleRequest(None, n, seed) for seed in range(k)]
        t0 = time.perf_counter()
        for r in reqs:
            sampler(None, n=r.n, steps=steps, seed=r.seed)
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        sampler.sample_batch(reqs, steps=steps)
        batched = time.perf_counter() - t0
        rows[k] = {"sequential_images_per_s": k * n / sequential, "batched_images_per_s": k * n / batched}
        print(f"library  K={k}: sequential {rows[k]['sequential_images_per_s']:6.1f} img/s, "
              f"batched {rows[k]['batched_images_per_s']:6.1f} img/s")
    return rows


def http(store_root: Path, n: int, steps: int, concurrency: list[int], requests_per_client: int,
         max_batch: int, warmup: int) -> dict:
    work = Path(tempfile.mkdtemp())
    root = work / "store"
    shutil.copytree(store_root, root, ignore=shutil.ignore_patterns("service.db*"))
    cdm = str(Path(sys.executable).with_name("cdm"))
    key = subprocess.run([cdm, "keys", "create", "--store", str(root), "--user", "bench",
                          "--license", "all"], capture_output=True, text=True, check=True).stdout.strip()
    port = 3917
    proc = subprocess.Popen([cdm, "serve", "--store", str(root), "--port", str(port)],
                            env={**os.environ, "CDM_MAX_BATCH": str(max_batch)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/readyz", timeout=2)
                break
            except OSError:
                time.sleep(0.5)

        def one(seed: int) -> float:
            body = json.dumps({"n": n, "steps": steps, "seed": seed}).encode()
            req = urllib.request.Request(f"{url}/generate", data=body, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                r.read()
            return time.perf_counter() - t0

        with ThreadPoolExecutor(max(concurrency)) as pool:  # past the dispatcher's training
            list(pool.map(one, range(warmup)))
        rows = {}
        for k in concurrency:
            total = k * requests_per_client
            t0 = time.perf_counter()
            with ThreadPoolExecutor(k) as pool:
                latencies = list(pool.map(one, range(total)))
            wall = time.perf_counter() - t0
            rows[k] = {"images_per_s": total * n / wall, "latency_p50_s": float(np.percentile(latencies, 50)),
                       "latency_p95_s": float(np.percentile(latencies, 95)), "requests": total}
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
                text = r.read().decode()
            count = sum_ = 0.0
            for line in text.splitlines():
                if line.startswith("cdm_generate_batch_requests_count"):
                    count = float(line.split()[-1])
                elif line.startswith("cdm_generate_batch_requests_sum"):
                    sum_ = float(line.split()[-1])
            rows[k]["mean_batch_requests_so_far"] = sum_ / count if count else None
            rows[k]["max_batch"] = max_batch
            print(f"http max_batch={max_batch} concurrency {k}: {rows[k]['images_per_s']:6.1f} img/s, latency p50 "
                  f"{rows[k]['latency_p50_s']:.2f}s p95 {rows[k]['latency_p95_s']:.2f}s ({total} requests; "
                  f"mean requests per batch so far {rows[k]['mean_batch_requests_so_far']:.2f})")
        return rows
    finally:
        import psutil

        procs = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for p in procs:
            p.terminate()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--n", type=int, default=4, help="images per request")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=32,
                        help="requests sent before measuring (BentoML's dispatcher trains first)")
    args = parser.parse_args()
    store = ShardStore.open(args.store)
    conc = [1, 4, 8]
    print(f"store {args.store}: {len(store.contributor_ids)} shards; n={args.n}, {args.steps} DDPM steps; "
          f"torch threads {__import__('torch').get_num_threads()}")
    report = {"n": args.n, "steps": args.steps, "library": library(store, args.n, args.steps, conc),
              "http_batched": http(store.root, args.n, args.steps, conc, args.requests_per_client,
                                   8, args.warmup),
              "http_unbatched": http(store.root, args.n, args.steps, conc, args.requests_per_client,
                                     1, args.warmup)}
    out = RESULTS / Path(args.store).name
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}/throughput.json")


if __name__ == "__main__":
    main()
