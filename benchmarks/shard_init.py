"""Where a studio's shard starts: from random weights or from the public base.

Compares each studio's shard in two stores built from the same data with the same
steps (`cdm train ... --shard-init scratch` and `--shard-init base`): samples of the
shard alone (`contributors=[s]`), their Frechet distance to that studio's own held-out
drawings in the features of the category CNN (benchmarks/evaluator.py), mean and
standard deviation over --seeds sampling seeds. Prints a table and writes
benchmarks/results/studios/shard_init.json; never passes or fails.

    .venv/bin/python benchmarks/shard_init.py --scratch var/studios-store-scratch \\
        --base var/studios-store
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
    parser.add_argument("--scratch", required=True, help="a store of shards from scratch")
    parser.add_argument("--base", required=True, help="the same, shards from the public base")
    parser.add_argument("--n", type=int, default=300, help="samples per seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    data = Path(args.data)
    stores = {"scratch": ShardStore.open(args.scratch), "base": ShardStore.open(args.base)}
    for name in stores:
        if stores[name].config.shard_init != name:
            parser.error(f"--{name} is a store of shard_init {stores[name].config.shard_init!r}")
    samplers = {k: s.load_sampler("cpu") for k, s in stores.items()}
    judge = DigitsEvaluator(data / "heldout")
    with open(data / "concepts.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "heldout"]
    owners = json.loads((data / "owners.json").read_text())["contributors"]
    honest = [c for c, e in owners.items() if not e["planted"]]
    out = {"n": args.n, "seeds": args.seeds, "machine": "2-core CPU, no GPU", "studios": {}}
    print(f"{'studio':14s} {'steps':>5s}  {'scratch FD':>14s}  {'base FD':>14s}")
    for s in honest:
        own = judge.stats(torch.cat([(_image(data / r["file"]) + 1) / 2
                                     for r in rows if r["studio"] == s]))
        fds = {name: [judge.fd(sample(sampler, [s], args.n, 1000 + seed, args.steps), own)
                      for seed in range(args.seeds)] for name, sampler in samplers.items()}
        steps = stores["base"].contributor(s)["steps"]
        out["studios"][s] = {"steps": steps, "fd": fds}
        print(f"{s:14s} {steps:5d}  " + "  ".join(
            f"{np.mean(fds[k]):6.2f} +- {np.std(fds[k], ddof=1):4.2f}" for k in ("scratch", "base")),
              flush=True)
    for k in ("scratch", "base"):
        means = [np.mean(v["fd"][k]) for v in out["studios"].values()]
        out[f"mean_{k}"] = float(np.mean(means))
    print(f"mean over studios: scratch {out['mean_scratch']:.2f}, base {out['mean_base']:.2f}")
    path = RESULTS / "shard_init.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
