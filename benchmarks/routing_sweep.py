"""FD and shard evaluations per sample and step of composed sampling under several
routings, for the default store's heads router and the joint router on the same
shards (as benchmarks/routing_quality.py builds it). Prints measured numbers and
writes benchmarks/results/routing/sweep.json; it does not pass or fail.

    python benchmarks/routing_sweep.py --data var/demo-data --store var/store \
        --routings dense,3:0.9,3:0.8,2:0.9,1:
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evaluator import DigitsEvaluator  # noqa: E402
from routing_quality import RESULTS, joint_copy  # noqa: E402

from shards import Routing, ShardStore  # noqa: E402


def parse(spec: str, sep: str = ":") -> Routing:
    """'dense', or 'K:MASS[:DRAW]' (top_k, mass, draw_above) with any part empty (e.g.
    '1:', ':0.9'); `sep` separates the parts."""
    if spec == "dense":
        return Routing()
    k, mass, draw = (spec.split(sep) + ["", ""])[:3]
    return Routing("topk", int(k) if k else None, float(mass) if mass else None,
                   draw_above=int(draw) if draw else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/demo-data")
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--routings", default="dense,3:0.9,3:0.8,2:0.9,1:")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    routings = [parse(s) for s in args.routings.split(",")]
    evaluator = DigitsEvaluator(Path(args.data) / "heldout", seed=args.seed)
    heads = ShardStore.open(args.store)
    work = Path(tempfile.mkdtemp(prefix="cdm-sweep-"))
    rows = []
    try:
        joint, _ = joint_copy(heads, work / "joint")
        for name, store in (("heads", heads), ("joint", joint)):
            sampler = store.load_sampler("cpu")
            for routing in routings:
                before = sampler.shard_rows
                out = sampler(None, n=args.n, steps=args.steps, seed=args.seed, routing=routing)
                row = {"router": name, "routing": str(routing), "fd": evaluator.fd(out.images),
                       "rows_per_sample_step": (sampler.shard_rows - before) / (args.n * args.steps)}
                rows.append(row)
                print(f"{name:6s} {row['routing']:32s} FD {row['fd']:.3f}  "
                      f"{row['rows_per_sample_step']:.2f} shard evals/sample/step", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep.json").write_text(json.dumps({"settings": vars(args), "rows": rows},
                                                   indent=2) + "\n")
    print(f"wrote {RESULTS / 'sweep.json'}")


if __name__ == "__main__":
    main()
