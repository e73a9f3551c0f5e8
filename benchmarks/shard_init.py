"""Each studio's shard in two or more stores built from the same data with the same
steps but another training setting: where it starts (`cdm train ... --shard-init
scratch` and `--shard-init base`), or its precision (`--precision fp32` and `bf16`).

Samples of the shard alone (`contributors=[s]`), their Frechet distance to that
studio's own held-out drawings in the features of the category CNN
(benchmarks/evaluator.py), mean and standard deviation over --seeds sampling seeds.
Prints a table and writes benchmarks/results/studios/<--out>.json; never passes or
fails.

    .venv/bin/python benchmarks/shard_init.py --stores scratch=var/studios-store-scratch,base=var/studios-store
    .venv/bin/python benchmarks/shard_init.py --stores fp32=var/studios-store,bf16=var/studios-store-bf16 \\
        --out shard_precision
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from evaluator import DigitsEvaluator
from studios import RESULTS, _image, sample

from shards import ShardStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/studios-data")
    parser.add_argument("--stores", required=True,
                        help="NAME=STORE, comma-separated: the stores to compare")
    parser.add_argument("--out", default="shard_init", help="results file name (.json)")
    parser.add_argument("--n", type=int, default=300, help="samples per seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    data = Path(args.data)
    stores = {name: ShardStore.open(path) for name, _, path in
              (item.partition("=") for item in args.stores.split(","))}
    names = list(stores)
    samplers = {k: s.load_sampler("cpu") for k, s in stores.items()}
    judge = DigitsEvaluator(data / "heldout")
    with open(data / "concepts.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "heldout"]
    owners = json.loads((data / "owners.json").read_text())["contributors"]
    honest = [c for c, e in owners.items() if not e["planted"]]
    out = {"n": args.n, "seeds": args.seeds, "machine": "2-core CPU, no GPU", "studios": {}}
    print(f"{'studio':14s} {'steps':>5s}  " + "  ".join(f"{k + ' FD':>14s}" for k in names))
    for s in honest:
        own = judge.stats(torch.cat([(_image(data / r["file"]) + 1) / 2
                                     for r in rows if r["studio"] == s]))
        fds = {name: [judge.fd(sample(sampler, [s], args.n, 1000 + seed, args.steps), own)
                      for seed in range(args.seeds)] for name, sampler in samplers.items()}
        steps = stores[names[-1]].contributor(s)["steps"]
        out["studios"][s] = {"steps": steps, "fd": fds}
        print(f"{s:14s} {steps:5d}  " + "  ".join(
            f"{np.mean(fds[k]):6.2f} +- {np.std(fds[k], ddof=1):4.2f}" for k in names),
              flush=True)
    for k in names:
        means = [np.mean(v["fd"][k]) for v in out["studios"].values()]
        out[f"mean_{k}"] = float(np.mean(means))
    print("mean over studios: " + ", ".join(f"{k} {out[f'mean_{k}']:.2f}" for k in names))
    out["stores"] = {k: str(s.root) for k, s in stores.items()}
    path = RESULTS / f"{args.out}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
