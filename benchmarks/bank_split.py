"""The shard bank's split of a routed step, fixed against measured (shards/passcost.py).

For each store: a sampler whose bank timed its passes on its first call, then for
each routing and batch size, requests of `--steps` DDPM steps sampled alternately
with the fixed threshold of before (a shard's rows run as a call of their own from 32
rows) and with the split chosen by measured cost, `--reps` times each, interleaved
(this machine's speed drifts); ms an image, their ratio, and the largest difference
between the two paths' images. Writes benchmarks/results/bank_split/<store>.json; it
does not pass or fail.

    python benchmarks/bank_split.py --stores var/store,var/studios-store
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("CDM_SOLO_ROWS", None)  # the bank measures

import torch  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.routing import DEFAULT_ROUTING, Routing  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bank_split"
ROUTINGS = {"default": DEFAULT_ROUTING, "drawn": Routing("topk", top_k=3, mass=0.9, draw_above=0),
            "dense": Routing()}


def run_store(path: str, args) -> dict:
    store = ShardStore.open(path)
    sampler = store.load_sampler("cpu")
    start = time.perf_counter()
    sampler(None, n=2, steps=1, seed=0, routing=DEFAULT_ROUTING)  # the first pass: timed
    costs = sampler.bank.costs
    out = {"store": path, "first_call_s": time.perf_counter() - start,
           "threads": torch.get_num_threads(), "pass_costs": vars(costs), "cases": []}
    print(f"{path}: plain ms {[round(v * 1e3, 1) for v in costs.plain]}, stacked ms "
          f"{[round(v * 1e3, 1) for v in costs.stacked]} at rows {list(costs.rows)}", flush=True)
    for name, routing in ROUTINGS.items():
        for n in args.ns:
            ms, images = {"fixed": [], "measured": []}, {}
            for rep in range(args.reps):
                for mode in ms:
                    sampler.bank.costs = None if mode == "fixed" else costs
                    t0 = time.perf_counter()
                    images[mode] = sampler(None, n=n, steps=args.steps, seed=rep,
                                           routing=routing).images
                    ms[mode].append((time.perf_counter() - t0) / n * 1000)
            fixed, measured = statistics.mean(ms["fixed"]), statistics.mean(ms["measured"])
            case = {"routing": name, "n": n, "fixed_ms": ms["fixed"], "measured_ms": ms["measured"],
                    "ratio": measured / fixed,
                    "max_abs_diff": float((images["fixed"] - images["measured"]).abs().max())}
            out["cases"].append(case)
            print(f"  {name:8s} n={n:3d}: fixed {fixed:6.2f} ms an image, measured {measured:6.2f} "
                  f"({case['ratio']:.2f}x); images differ by {case['max_abs_diff']:.1e} at most",
                  flush=True)
    sampler.bank.costs = costs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="var/store,var/studios-store")
    parser.add_argument("--ns", type=lambda s: [int(v) for v in s.split(",")], default=[8, 32, 100])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path in args.stores.split(","):
        result = run_store(path, args)
        (RESULTS / f"{Path(path).name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
