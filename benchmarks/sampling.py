"""Sampling cost against quality: FD of the composition over all contributors for each
case (a scheduler, a number of steps and a routing) against 50-step DDPM with the
default routing, the seconds an image each costs and the shards evaluated per sample
and step. Prints a table, writes benchmarks/results/<--out>/sampling.json and
sampling.png; it does not pass or fail.

A case is `scheduler:steps[:routing]`; routing is `default` (when left out), `dense`,
or `K/MASS/DRAW` with any part empty (top_k, mass, draw_above: routing.py), e.g.
`ddpm:50:3/0.9/600` is the default's top 3 within 90% of the weight, with one shard
drawn per sample at timesteps above 600.

FD is to the store's held-out images in a category classifier's features
(benchmarks/evaluator.py), over --seeds sampling seeds (mean and standard error), the
same seeds for every case. The mean attribution of the samples to each contributor is
recorded too: a solver that drifts the mixture toward some shards shows there.

    .venv/bin/python benchmarks/sampling.py --store var/studios-store --data var/studios-data \
        --out sampling-studios
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
from shards.routing import DEFAULT_ROUTING, Routing  # noqa: E402
from shards.sampler import SampleRequest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from evaluator import DigitsEvaluator  # noqa: E402
from routing_sweep import parse  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = "ddpm:50,ddpm:30,ddpm:20,ddim:20,dpmpp-2m:20,unipc:20,dpmpp-2m-sde:15,dpmpp-2m-sde:20," \
        "dpmpp-2m-sde:25,dpmpp-2m-sde:30"


def parse_routing(spec: str) -> Routing:
    """'default', or routing_sweep.py's spec with '/' between the parts."""
    return DEFAULT_ROUTING if spec == "default" else parse(spec, sep="/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="its demo data (heldout/)")
    parser.add_argument("--cases", default=CASES, help="scheduler:steps, comma-separated")
    parser.add_argument("--n", type=int, default=400, help="samples per case and seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="sampling")
    parser.add_argument("--one", default=None,
                        help="also time this contributor alone (one shard, no router) per seed")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = [(c + ":default").split(":")[:3] if c.count(":") == 1 else c.split(":")
             for c in args.cases.split(",")]
    sampler = ShardStore.open(args.store).load_sampler("cpu")
    judge = DigitsEvaluator(args.data / "heldout")
    rows = {f"{name}:{steps}:{routing}": {
        "scheduler": name, "steps": int(steps), "routing": routing, "fd": [], "seconds": [],
        "rows_per_sample_step": [], "attribution": []} for name, steps, routing in cases}
    one = []  # seconds an image of --one alone, 50 DDPM steps
    for seed in range(args.seeds):
        if args.one:
            start = time.perf_counter()
            sampler.sample_batch([SampleRequest((args.one,), args.n, 1000 + seed)], steps=50)
            one.append((time.perf_counter() - start) / args.n)
            print(f"seed {seed} one shard ({args.one}) {one[-1] * 1000:.1f} ms an image", flush=True)
        for key, row in rows.items():
            request = SampleRequest(None, args.n, 1000 + seed)
            before, start = sampler.shard_rows, time.perf_counter()
            out = sampler.sample_batch([request], steps=row["steps"], scheduler=row["scheduler"],
                                       routing=parse_routing(row["routing"]))[0]
            row["seconds"].append((time.perf_counter() - start) / args.n)
            row["rows_per_sample_step"].append(
                (sampler.shard_rows - before) / (args.n * row["steps"]))
            row["fd"].append(judge.fd(out.images))
            row["attribution"].append(dict(zip(out.contributor_ids,
                                               out.attribution_mean.mean(0).tolist(), strict=True)))
            print(f"seed {seed} {key:24s} FD {row['fd'][-1]:.3f}  "
                  f"{row['seconds'][-1] * 1000:.1f} ms an image  "
                  f"{row['rows_per_sample_step'][-1]:.2f} shards/sample/step", flush=True)
    ref, dense = rows.get("ddpm:50:default"), rows.get("ddpm:50:dense")
    print(f"\n{args.store}: {args.n} samples, {args.seeds} seeds, "
          f"{torch.get_num_threads()} threads; default routing {DEFAULT_ROUTING}")
    print(f"{'case':24s} {'FD':>14s} {'vs ddpm:50':>15s} {'ms/image':>9s} {'speed-up':>8s} "
          f"{'shards':>6s}")
    for key, row in rows.items():
        fd, sec = np.asarray(row["fd"]), np.asarray(row["seconds"])
        row["fd_mean"], row["fd_se"] = float(fd.mean()), float(fd.std(ddof=1) / np.sqrt(len(fd)))
        row["seconds_mean"] = float(sec.mean())
        row["rows_mean"] = float(np.mean(row["rows_per_sample_step"]))
        if dense is not None:
            rel = fd / np.asarray(dense["fd"]) - 1
            row["fd_vs_dense"] = float(rel.mean())
            row["fd_vs_dense_se"] = float(rel.std(ddof=1) / np.sqrt(len(rel)))
        if one:
            row["cost_vs_one_shard"] = float(sec.mean() / np.mean(one))
        if ref is not None:  # paired over seeds: the same x_T for every case
            rel = fd / np.asarray(ref["fd"]) - 1
            row["fd_vs_ddpm50"] = float(rel.mean())
            row["fd_vs_ddpm50_se"] = float(rel.std(ddof=1) / np.sqrt(len(rel)))
            row["speedup"] = float(np.mean(ref["seconds"]) / sec.mean())
        print(f"{key:24s} {row['fd_mean']:7.3f} +- {row['fd_se']:.3f} "
              + (f"{row['fd_vs_ddpm50'] * 100:+7.1f}% +- {row['fd_vs_ddpm50_se'] * 100:4.1f} "
                 f"{row['seconds_mean'] * 1000:9.1f} {row['speedup']:7.2f}x" if ref else "")
              + f" {row['rows_mean']:6.2f}"
              + (f"  vs dense {row['fd_vs_dense'] * 100:+.1f}% +- {row['fd_vs_dense_se'] * 100:.1f}"
                 if dense else "")
              + (f"  {row['cost_vs_one_shard']:.2f}x one shard" if one else ""))
    if one:
        print(f"one shard ({args.one}) alone: {np.mean(one) * 1000:.1f} ms an image")
    out_dir = RESULTS / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"store": str(args.store), "n": args.n, "seeds": args.seeds,
                "one_shard": {"contributor": args.one, "seconds": one} if one else None,
                "default_routing": str(DEFAULT_ROUTING), "threads": torch.get_num_threads()}
    (out_dir / "sampling.json").write_text(json.dumps({"settings": settings, "cases": rows},
                                                     indent=2))
    plot(rows, out_dir / "sampling.png", str(args.store))
    print(f"wrote {out_dir}/sampling.json and sampling.png")
    return 0


def plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for line in dict.fromkeys((r["scheduler"], r["routing"]) for r in rows.values()):
        pts = sorted((r["seconds_mean"] * 1000, r["fd_mean"], r["fd_se"], r["steps"])
                     for r in rows.values() if (r["scheduler"], r["routing"]) == line)
        ms, fd, se, steps = zip(*pts, strict=True)
        ax.errorbar(ms, fd, yerr=se, marker="o", capsize=3, label=" ".join(line))
        for x, y, k in zip(ms, fd, steps, strict=True):
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("ms an image (points: sampling steps)")
    ax.set_ylabel("FD to held-out (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"composed over all: {title}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
