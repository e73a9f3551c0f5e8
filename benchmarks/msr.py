"""Banzhaf by maximum sample reuse (MSR) against exact Banzhaf at N = 12 (issue 10):
the rank correlation of MSR's values with the exact ones as a function of the number
of distinct coalitions MSR evaluates, over several seeds.

A 12-contributor split of the digits (`write_demo_data(contributors=12)`: 11 honest
contributors of one to three digits and the planted `mallory`), a store with shorter
training than the default (shards 400 steps, heads 1,000: cheaper, stated in the
results), and U(S) = a property of the composition restricted to S with cheaper
sampling than the default (n = 64 samples, 10 DDPM steps, seed 0). Exact Banzhaf needs
all 2^12 = 4,096 coalitions; they are computed once (cached in the store, resumable),
and every MSR run then reads from them, so the MSR curves cost nothing more.

Prints measured numbers and writes RESULTS/msr.json, msr.md and msr.png; it does not
pass or fail.

    python benchmarks/msr.py --workers 2          # ~35 min on 2 cores
    python benchmarks/msr.py --quick              # ~2 min: N = 5, tiny everything
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detect import images_and_labels  # noqa: E402
from scipy.stats import kendalltau, spearmanr  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shards import ShardStore, StoreConfig, load_contributors  # noqa: E402
from shards.demo import write_demo_data  # noqa: E402
from shards.training import TrainConfig  # noqa: E402
from valuation.properties import build_evaluator, evaluator_dir  # noqa: E402
from valuation.semivalues import msr_banzhaf, semivalue_weights  # noqa: E402
from valuation.shapley import exact_semivalue  # noqa: E402
from valuation.stopping import StoppingRule  # noqa: E402
from valuation.utility import CachedUtility, CompositionUtility, store_cache  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "msr"
BUDGETS = (32, 64, 128, 256, 410, 512, 819, 1024, 1536, 2048)


def build(work: Path, contributors: int, shard_steps: int, head_steps: int,
          device: str = "cpu") -> ShardStore:
    data = work / "data"
    if not (data / "owners.json").exists():
        write_demo_data(data, contributors=contributors)
    root = work / "store"
    if (root / "manifest.json").exists():
        return ShardStore.open(root)
    config = StoreConfig(shard_train=TrainConfig(steps=shard_steps, ema=True),
                         head_train=TrainConfig(steps=head_steps, batch_size=128))
    start = time.perf_counter()
    # unconditional shards, as the default store's (labelled demo data: labels dropped)
    datasets = [replace(d, labels=None) if getattr(d, "labels", None) is not None else d
                for d in load_contributors(data / "contributors")]
    public = torch.as_tensor(images_and_labels(data / "public")[0][:, None] * 2 - 1,
                             dtype=torch.float32)
    store = ShardStore.create(root, datasets, config, public=public, device=device)
    print(f"store of {contributors} contributors built in {time.perf_counter() - start:.0f} s",
          flush=True)
    return store


def curve(u, exact: dict, budgets, seeds) -> list[dict]:
    """MSR at each budget of distinct coalitions, per seed: Spearman and Kendall with
    the exact Banzhaf values."""
    players = list(u.players)
    truth = [exact[p] for p in players]
    rows = []
    for budget in tqdm(budgets, desc="msr budgets", leave=False):
        runs = []
        for seed in seeds:
            r = msr_banzhaf(u, StoppingRule(max_evaluations=budget), seed=seed)
            est = [r[p] for p in players]
            runs.append({"seed": seed, "evaluations": r.evaluations, "samples": r.samples,
                         "same_lowest": bool(np.argmin(est) == np.argmin(truth)),
                         "spearman": float(spearmanr(est, truth).statistic),
                         "kendall": float(kendalltau(est, truth).statistic)})
        rho = np.array([x["spearman"] for x in runs])
        rows.append({"budget": budget, "evaluations": float(np.mean([x["evaluations"]
                                                                       for x in runs])),
                     "spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
                     "spearman_p10": float(np.percentile(rho, 10)),
                     "kendall_mean": float(np.mean([x["kendall"] for x in runs])),
                     "share_at_0.9": float(np.mean(rho >= 0.9)),
                     "same_lowest": float(np.mean([x["same_lowest"] for x in runs])), "runs": runs})
    return rows


def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "msr.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["settings"]
    lines = [f"# Banzhaf MSR vs exact Banzhaf at N = {result['n_players']}\n",
             f"`{result['command']}`\n",
             f"Store: {result['store']} ({result['n_players']} contributors; shards "
             f"{s['shard_steps']} steps, heads {s['head_steps']} steps). U(S): composition, "
             f"n = {s['n']} samples, {s['steps']} DDPM steps, seed {s['seed']}. Exact Banzhaf: "
             f"all {result['exact_evaluations']} coalitions ({result['computed']} computed in this "
             f"run with {s['workers']} workers in {result['seconds']['exact']:.0f} s, the rest "
             f"read from the cache; {result['seconds_per_coalition']:.2f} s per coalition "
             "when computed, one thread). MSR: "
             f"{len(result['seeds'])} seeds per budget; evaluations = distinct coalitions, "
             "the empty and full ones included; lowest as exact's: share of seeds whose "
             "lowest-valued contributor is exact Banzhaf's lowest.\n"]
    for prop, block in result["properties"].items():
        lines += [f"## {prop}\n", "Exact Banzhaf: " + ", ".join(
            f"{p} {v:.4g}" for p, v in sorted(block["exact"].items(), key=lambda kv: -kv[1])) + "\n",
            "| budget | mean evaluations | x fewer than exact | Spearman mean | p10 | min | "
            "share of seeds >= 0.9 | Kendall mean | lowest as exact's |",
            "|---|---|---|---|---|---|---|---|---|"]
        for r in block["curve"]:
            lines.append(f"| {r['budget']} | {r['evaluations']:.0f} | "
                         f"{result['exact_evaluations'] / r['evaluations']:.1f} | "
                         f"{r['spearman_mean']:.3f} | {r['spearman_p10']:.3f} | "
                         f"{r['spearman_min']:.3f} | {r['share_at_0.9']:.0%} | "
                         f"{r['kendall_mean']:.3f} | {r['same_lowest']:.0%} |")
        first = block["first_budget_mean_0.9"]
        lines.append("\nSmallest budget with mean Spearman >= 0.9: " + (
            f"{first} ({result['exact_evaluations'] / first:.1f}x fewer than exact)"
            if first else "none measured") + "\n")
    (out / "msr.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prop, block in result["properties"].items():
        x = [r["evaluations"] for r in block["curve"]]
        line, = ax.plot(x, [r["spearman_mean"] for r in block["curve"]], "o-", label=prop)
        ax.fill_between(x, [r["spearman_min"] for r in block["curve"]],
                        [max(x["spearman"] for x in r["runs"]) for r in block["curve"]],
                        color=line.get_color(), alpha=0.15)
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.axvline(result["exact_evaluations"] / 5, color="red", ls=":", lw=0.8,
               label="exact / 5")
    ax.set_xscale("log")
    ax.set_xlabel("distinct coalitions evaluated by MSR")
    ax.set_ylabel("Spearman with exact Banzhaf")
    ax.set_title(f"Banzhaf MSR at N = {result['n_players']} (mean, min-max over seeds)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "msr.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="var/msr")
    parser.add_argument("--contributors", type=int, default=12)
    parser.add_argument("--shard-steps", type=int, default=400)
    parser.add_argument("--head-steps", type=int, default=1000)
    parser.add_argument("--properties", default="precision,quality")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=20, help="MSR seeds per budget")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--device", default="cpu", help="for training the store only")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.contributors, args.shard_steps, args.head_steps = 5, 50, 50
        args.n, args.steps, args.seeds, args.budgets = 16, 3, 4, "8,16,24"
        args.work = args.work if args.work != "var/msr" else "var/msr-quick"
        args.out = args.out if args.out != str(RESULTS) else str(Path(args.work) / "results")
    work = Path(args.work)
    t0 = time.perf_counter()
    store = build(work, args.contributors, args.shard_steps, args.head_steps, args.device)
    if not (evaluator_dir(store.root) / "evaluator.json").exists():
        build_evaluator(store.root, work / "data" / "heldout", seed=args.seed)
    t_build = time.perf_counter() - t0
    n = len(store.contributor_ids)
    budgets = [b for b in map(int, args.budgets.split(",")) if b < 2 ** n]
    seeds = list(range(args.seeds))
    settings = {"n": args.n, "steps": args.steps, "seed": args.seed, "scheduler": "ddpm"}
    props = [p for p in args.properties.split(",") if p]
    result = {"command": "python benchmarks/msr.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "store": str(store.root), "n_players": n,
        "players": list(store.contributor_ids), "seeds": seeds,
        "settings": {**settings, "workers": args.workers, "shard_steps": args.shard_steps,
                     "head_steps": args.head_steps, "contributors": args.contributors},
        "exact_evaluations": 2 ** n, "properties": {}, "seconds": {"build": t_build}}
    for i, prop in enumerate(props):
        kwargs = {"store_root": str(store.root), "property": prop, **settings}
        u = CachedUtility(CompositionUtility(**kwargs), store_cache(store),
                          args.workers if i == 0 else 1, (CompositionUtility, kwargs),
                          progress=True)
        start = time.perf_counter()
        try:
            exact = exact_semivalue(u, semivalue_weights("banzhaf", n), "banzhaf", progress=True)
        finally:
            u.close()
        if i == 0:
            result["seconds"]["exact"] = time.perf_counter() - start
            result["computed"] = u.evaluations
            result["seconds_per_coalition"] = (sum(u.seconds.values()) / len(u.seconds))
        values = {p: float(v) for p, v in zip(exact.players, exact.values, strict=True)}
        print(f"{prop}: exact Banzhaf in {time.perf_counter() - start:.0f} s "
              f"({u.evaluations} computed, {u.hits} cached)", flush=True)
        rows = curve(u, values, budgets, seeds)
        first = next((r["budget"] for r in rows if r["spearman_mean"] >= 0.9), None)
        result["properties"][prop] = {"exact": values, "curve": rows,
                                      "first_budget_mean_0.9": first}
    result["seconds"]["total"] = time.perf_counter() - t0
    out = Path(args.out)
    write_outputs(out, result)
    print((out / "msr.md").read_text())


if __name__ == "__main__":
    main()
