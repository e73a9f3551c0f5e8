"""Sampling steps against quality: FD of the composition over all contributors (the
default routing) for each scheduler and number of steps, against 50-step DDPM, and the
seconds an image each costs. Prints a table, writes benchmarks/results/<--out>/
solvers.json and solvers.png; it does not pass or fail.

FD is to the store's held-out images in a category classifier's features
(benchmarks/evaluator.py), over --seeds sampling seeds (mean and standard error), the
same seeds for every case. The mean attribution of the samples to each contributor is
recorded too: a solver that drifts the mixture toward some shards shows there.

    .venv/bin/python benchmarks/solvers.py --store var/studios-store --data var/studios-data \
        --out solvers-studios
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.routing import DEFAULT_ROUTING  # noqa: E402
from shards.sampler import SampleRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from evaluator import DigitsEvaluator  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = "ddpm:50,ddpm:30,ddpm:20,ddim:20,dpmpp-2m:20,unipc:20,dpmpp-2m-sde:15,dpmpp-2m-sde:20," \
        "dpmpp-2m-sde:25,dpmpp-2m-sde:30"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="its demo data (heldout/)")
    parser.add_argument("--cases", default=CASES, help="scheduler:steps, comma-separated")
    parser.add_argument("--n", type=int, default=400, help="samples per case and seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="solvers")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [(name, int(steps)) for name, steps in (c.split(":") for c in args.cases.split(","))]
    sampler = ShardStore.open(args.store).load_sampler("cpu")
    judge = DigitsEvaluator(args.data / "heldout")
    rows = {f"{name}:{steps}": {"scheduler": name, "steps": steps, "fd": [], "seconds": [],
                                "attribution": []} for name, steps in cases}
    for seed in range(args.seeds):
        for key, row in rows.items():
            request = SampleRequest(None, args.n, 1000 + seed)
            start = time.perf_counter()
            out = sampler.sample_batch([request], steps=row["steps"], scheduler=row["scheduler"],
                                       routing=DEFAULT_ROUTING)[0]
            row["seconds"].append((time.perf_counter() - start) / args.n)
            row["fd"].append(judge.fd(out.images))
            row["attribution"].append(dict(zip(out.contributor_ids,
                                               out.attribution_mean.mean(0).tolist(), strict=True)))
            print(f"seed {seed} {key:18s} FD {row['fd'][-1]:.3f}  "
                  f"{row['seconds'][-1] * 1000:.1f} ms an image", flush=True)
    ref = rows.get("ddpm:50")
    print(f"\n{args.store}: {args.n} samples, {args.seeds} seeds, default routing, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':18s} {'FD':>14s} {'vs ddpm:50':>12s} {'ms/image':>9s} {'speed-up':>8s}")
    for key, row in rows.items():
        fd, sec = np.asarray(row["fd"]), np.asarray(row["seconds"])
        row["fd_mean"], row["fd_se"] = float(fd.mean()), float(fd.std(ddof=1) / np.sqrt(len(fd)))
        row["seconds_mean"] = float(sec.mean())
        if ref is not None:  # paired over seeds: the same x_T for every case
            rel = fd / np.asarray(ref["fd"]) - 1
            row["fd_vs_ddpm50"] = float(rel.mean())
            row["fd_vs_ddpm50_se"] = float(rel.std(ddof=1) / np.sqrt(len(rel)))
            row["speedup"] = float(np.mean(ref["seconds"]) / sec.mean())
        print(f"{key:18s} {row['fd_mean']:7.3f} +- {row['fd_se']:.3f} "
              + (f"{row['fd_vs_ddpm50'] * 100:+7.1f}% +- {row['fd_vs_ddpm50_se'] * 100:4.1f} "
                 f"{row['seconds_mean'] * 1000:7.1f} {row['speedup']:7.2f}x" if ref else ""))
    out_dir = RESULTS / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"store": str(args.store), "n": args.n, "seeds": args.seeds,
                "routing": str(DEFAULT_ROUTING), "threads": torch.get_num_threads()}
    (out_dir / "solvers.json").write_text(json.dumps({"settings": settings, "cases": rows},
                                                     indent=2))
    plot(rows, out_dir / "solvers.png", str(args.store))
    print(f"wrote {out_dir}/solvers.json and solvers.png")
    return 0


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["scheduler"] for r in rows.values()):
        pts = sorted((r["steps"], r["fd_mean"], r["fd_se"]) for r in rows.values()
                     if r["scheduler"] == name)
        steps, fd, se = zip(*pts, strict=True)
        ax.errorbar(steps, fd, yerr=se, marker="o", capsize=3, label=name)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD to held-out (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"composed over all, default routing: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
