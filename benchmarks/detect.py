"""Planted-noise benchmark (issue 10, section 3): do the semivalues rank planted bad
contributors lowest, and do they keep the honest contributors' order?

A copy of the default store (6 honest contributors and `mallory`, its planted noisy
one) gets one more contributor per planted kind, 80 images each (8 per digit of the
`public/` split, so nobody's data, then corrupted; seeded):

    gauss15, gauss30, gauss60   Gaussian pixel noise, std 0.15 / 0.3 / 0.6
    drop50                      50% of the pixels set to 0
    dup-alice                   near-duplicates of 80 of alice's images (+ noise std 0.02)
    blank                       blank images (0 + |noise| std 0.02): no digit at all
    invert                      inverted digits (1 - x): not in the held-out set

A *case* is a player subset: the 6 honest contributors plus one planted (or two, for
the pairs), valued over that subset only (`SubsetUtility`, a view of one cached
composition utility over the whole store). With the heads router, U(S) depends on S
only, so the honest coalitions are shared by every case and already cached with the
default store; each single case costs 64 new coalitions, each pair 64 more.

For every (property, method): the rank of each planted contributor (1 = highest
value), the AUROC of "planted" against the value (the probability that an honest
contributor is valued above a planted one; 1 = planted always lowest) and the
Spearman correlation of the honest contributors' values in the case with their values
in the honest-only game (how well the order of the honest is kept). Prints measured
numbers and writes RESULTS/detect.json, table.md and detect.png; it does not pass or
fail.

    python benchmarks/detect.py --workers 2            # ~35 min on 2 cores
    python benchmarks/detect.py --quick                # ~3 min: a tiny version
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.data import load_contributor, load_image_folder  # noqa: E402
from shards.demo import N_CLASSES, split_sizes, write_labelled, write_pngs  # noqa: E402
from shards.settings import BETA_ALPHA, BETA_BETA  # noqa: E402
from valuation import methods as valuation_methods  # noqa: E402
from valuation.properties import build_evaluator, evaluator_dir  # noqa: E402
from valuation.run import ValuationSettings  # noqa: E402
from valuation.utility import CachedUtility, CompositionUtility, store_cache  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "detect"
HONEST = ("alice", "bob", "carol", "dave", "erin", "frank")
KINDS = ("gauss15", "gauss30", "gauss60", "drop50", "dup-alice", "blank", "invert")
PAIRS = (("gauss30", "blank"), ("mallory", "dup-alice"))
PER_DIGIT = 8
METHODS = ("exact", "banzhaf", "beta-shapley", "loo")
PROPERTIES = ("precision", "quality", "recall", "confidence", "diversity")


# ------------------------------------------------------------------ planted data
def images_and_labels(folder: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images in [0, 1], (N, H, W), of a flat folder (labels None) or of a labelled
    one (`<digit>/*.png`, the layout of labelled demo data; labels from the names)."""
    subdirs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                     key=lambda p: int(p.name))
    if not subdirs:
        return (load_image_folder(folder).numpy()[:, 0] + 1) / 2, None
    parts = [(load_image_folder(p).numpy()[:, 0] + 1) / 2 for p in subdirs]
    labels = np.concatenate([np.full(len(x), int(p.name)) for p, x in zip(subdirs, parts, strict=True)])
    return np.concatenate(parts), labels


def public_with_labels(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `public/` images in [0, 1] and their digits. Unlabelled demo data writes them
    digit by digit, `split_sizes(class size)[1]` of each, so the labels follow the order."""
    from sklearn.datasets import load_digits

    images, labels = images_and_labels(data_dir / "public")
    if labels is not None:
        return images, labels
    counts = np.bincount(load_digits().target, minlength=N_CLASSES)
    labels = np.concatenate([np.full(split_sizes(int(n))[1], d) for d, n in enumerate(counts)])
    if len(labels) != len(images):
        raise ValueError(f"{data_dir}/public has {len(images)} images, the default split "
                         f"{len(labels)}: not the default demo data")
    return images, labels


def planted_images(kind: str, data_dir: Path, seed: int = 0) -> np.ndarray:
    """80 images in [0, 1] of planted `kind` (module docstring), seeded."""
    return planted(kind, data_dir, seed)[0]


def planted(kind: str, data_dir: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`planted_images` and each image's label: the digit it was made from (for
    `dup-alice`, alice's label; `blank` and `invert` keep their source digit's)."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    images, labels = public_with_labels(data_dir)
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == d), PER_DIGIT, replace=False)
                           for d in range(N_CLASSES)])
    x, y = images[pick], labels[pick]
    if kind.startswith("gauss"):
        x = x + rng.normal(0.0, int(kind[5:]) / 100, size=x.shape)
    elif kind == "drop50":
        x = x * (rng.random(x.shape) >= 0.5)
    elif kind == "dup-alice":
        alice, alice_labels = images_and_labels(data_dir / "contributors" / "alice")
        chosen = rng.choice(len(alice), len(x), replace=False)
        x = alice[chosen]
        if alice_labels is not None:
            y = alice_labels[chosen]
        x = x + rng.normal(0.0, 0.02, size=x.shape)
    elif kind == "blank":
        x = np.abs(rng.normal(0.0, 0.02, size=x.shape))
    elif kind == "invert":
        x = 1.0 - x
    else:
        raise ValueError(f"kind={kind!r}; allowed: {list(KINDS)}")
    return np.clip(x, 0.0, 1.0), y


def build_store(work: Path, source: Path, data_dir: Path, kinds, train: dict | None) -> ShardStore:
    """`work`/store: a copy of `source` (its valuation cache included) with one planted
    contributor per kind added (skipped when already there: the run resumes).
    `train` overrides the copy's shard and head training steps (--quick)."""
    root = work / "store"
    if not (root / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(source, root, ignore=shutil.ignore_patterns("service.db*"))
        if train:
            manifest = json.loads((root / "manifest.json").read_text())
            for part in ("shard_train", "head_train"):
                manifest["config"][part]["steps"] = train[part]
            (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    store = ShardStore.open(root)
    missing = [k for k in kinds if k not in store.contributor_ids]
    for kind in missing:
        folder = work / "data" / kind
        if not folder.exists():
            x, y = planted(kind, data_dir)
            if store.num_labels:  # a class-conditional store: labelled planted data
                write_labelled(folder, kind, x, y)
            else:
                write_pngs(folder, kind, x)
        start = time.perf_counter()
        store.add(load_contributor(folder, kind), device="cpu", progress=True)
        print(f"added {kind}: {time.perf_counter() - start:.0f} s", flush=True)
    return store


# ------------------------------------------------------------------ arithmetic
class SubsetUtility:
    """The `Utility` of the estimators restricted to `players`: the game among a subset
    of the players of `utility` (a `CachedUtility` over the whole store), sharing its
    cache and memo. With a router whose U(S) depends on S alone (heads), the values of
    this game are those of a store holding only these players."""

    def __init__(self, utility, players):
        players = tuple(sorted(players))
        bad = set(players) - set(utility.players)
        if bad:
            raise ValueError(f"players {sorted(bad)} are not in {list(utility.players)}")
        self.utility, self.players, self.property = utility, players, utility.property

    def many(self, coalitions):
        coalitions = [frozenset(c) for c in coalitions]
        for c in coalitions:
            if not c <= set(self.players):
                raise ValueError(f"coalition {sorted(c)} is not within {list(self.players)}")
        return self.utility.many(coalitions)


def all_coalitions(players) -> list[frozenset]:
    players = sorted(players)
    return [frozenset(c) for k in range(len(players) + 1)
            for c in itertools.combinations(players, k)]


def values_of(utility, methods=METHODS, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> dict:
    """{method: {player: value}} on `utility` by valuation's own methods (methods.py)."""
    settings = ValuationSettings(methods=tuple(methods), alpha=alpha, beta=beta)
    out = {}
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"method={name!r}; allowed: {list(METHODS)}")
        r = valuation_methods.method(name).estimate(utility, None, settings, False)
        out[name] = {p: float(v) for p, v in zip(r.players, r.values, strict=True)}
    return out


def auroc(values: dict, planted) -> float:
    """P(an honest player's value > a planted player's value), ties counting 1/2: the
    AUROC of 'planted' scored by low value (1: every planted below every honest)."""
    planted = set(planted)
    honest = [v for p, v in values.items() if p not in planted]
    bad = [values[p] for p in planted]
    if not honest or not bad:
        raise ValueError("AUROC needs at least one planted and one honest player")
    wins = [1.0 if h > b else 0.5 if h == b else 0.0 for h in honest for b in bad]
    return float(np.mean(wins))


def rank(values: dict, player: str) -> int:
    """1 + the number of players valued strictly above `player` (1 = highest)."""
    return 1 + sum(v > values[player] for v in values.values())


def honest_spearman(values: dict, honest_only: dict) -> float:
    """Spearman between the honest players' values in a case and in the honest-only game."""
    players = sorted(honest_only)
    rho = spearmanr([values[p] for p in players], [honest_only[p] for p in players]).statistic
    return float(rho)


def case_metrics(values: dict, planted, honest_only: dict) -> dict:
    return {"auroc": auroc(values, planted),
            "ranks": {p: rank(values, p) for p in planted},
            "honest_spearman": honest_spearman(values, honest_only),
            "values": values}


def summarise(cases: dict, honest_game: dict, properties, methods) -> dict:
    """Per (property, method): mean and min AUROC over the cases, mean planted rank,
    mean and min honest Spearman. `cases` = {name: (planted, {property: values_of})}."""
    table = {}
    for prop in properties:
        for method in methods:
            rows = {name: case_metrics(vals[prop][method], planted, honest_game[prop][method])
                    for name, (planted, vals) in cases.items()}
            aurocs = [r["auroc"] for r in rows.values()]
            rhos = [r["honest_spearman"] for r in rows.values()]
            table[f"{prop}/{method}"] = {
                "property": prop, "method": method, "mean_auroc": float(np.mean(aurocs)),
                "min_auroc": float(np.min(aurocs)),
                "lowest_share": float(np.mean([a == 1.0 for a in aurocs])),
                "mean_honest_spearman": float(np.mean(rhos)),
                "min_honest_spearman": float(np.min(rhos)), "cases": rows}
    return table


# ------------------------------------------------------------------ report
def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect.json").write_text(json.dumps(result, indent=1) + "\n")
    table, cases = result["table"], result["cases"]
    lines = [f"# Planted-noise benchmark\n\n`{result['command']}`\n",
             f"Store: {result['store']}; samples n = {result['settings']['n']}, "
             f"{result['settings']['steps']} {result['settings']['scheduler']} steps, seed "
             f"{result['settings']['seed']}. {result['coalitions']['computed']} coalitions "
             f"sampled in this run, {result['coalitions']['cached']} read from the cache; "
             f"{result['seconds']['total']:.0f} s in all (building the planted "
             f"contributors {result['seconds']['build']:.0f} s).\n",
             "AUROC: P(honest value > planted value) within a case (1 = planted always "
             "lowest); lowest: share of cases whose planted are exactly the lowest; honest "
             "Spearman: the honest contributors' values in the case against the honest-only "
             "game.\n",
             "| property | method | mean AUROC | min AUROC | planted lowest | "
             "mean honest Spearman | min honest Spearman |", "|---|---|---|---|---|---|---|"]
    for row in table.values():
        lines.append(f"| {row['property']} | {row['method']} | {row['mean_auroc']:.3f} | "
                     f"{row['min_auroc']:.3f} | {row['lowest_share']:.0%} | "
                     f"{row['mean_honest_spearman']:.3f} | {row['min_honest_spearman']:.3f} |")
    names = list(cases)
    lines += ["", "Rank of the planted contributor(s) (1 = highest of 7, or of 8 for pairs):", "",
              "| property | method | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for row in table.values():
        cells = [", ".join(f"{r}" for r in row["cases"][c]["ranks"].values()) for c in names]
        lines.append(f"| {row['property']} | {row['method']} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(out / "detect.png", result)


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    props, methods = result["properties"], result["methods"]
    names = list(result["cases"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    for ax, key, title in ((axes[0], "mean_auroc", "mean AUROC (planted lowest = 1)"),
                           (axes[1], "mean_honest_spearman", "honest order kept (Spearman)")):
        grid = np.array([[result["table"][f"{p}/{m}"][key] for m in methods] for p in props])
        im = ax.imshow(grid, vmin=-1 if "spearman" in key else 0, vmax=1, cmap="RdYlGn")
        ax.set_xticks(range(len(methods)), methods, rotation=30)
        ax.set_yticks(range(len(props)), props)
        for i in range(len(props)):
            for j in range(len(methods)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    width = 0.8 / len(props)
    for k, prop in enumerate(props):
        aurocs = [result["table"][f"{prop}/exact"]["cases"][c]["auroc"] for c in names]
        ax.bar(np.arange(len(names)) + (k - (len(props) - 1) / 2) * width, aurocs, width,
               label=prop)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_title("AUROC per case, exact Shapley", fontsize=10)
    ax.legend(fontsize=8, ncol=len(props), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/demo-data")
    parser.add_argument("--store", default="var/store", help="the default store (copied)")
    parser.add_argument("--work", default="var/detect", help="copy, planted data and cache")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--pairs", default=",".join("+".join(p) for p in PAIRS))
    parser.add_argument("--properties", default=",".join(PROPERTIES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=BETA_ALPHA, help="beta-shapley: Beta(alpha, beta)")
    parser.add_argument("--beta", type=float, default=BETA_BETA, help="beta-shapley")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true",
                        help="2 kinds, 1 pair, n=32, 5 steps, 200-step shards and heads, "
                             "work and out under var/detect-quick")
    args = parser.parse_args(argv)
    train = None
    if args.quick:
        args.kinds, args.pairs, args.n, args.steps = "gauss60,blank", "gauss60+blank", 32, 5
        args.work = args.work if args.work != "var/detect" else "var/detect-quick"
        args.out = args.out if args.out != str(RESULTS) else str(Path(args.work) / "results")
        train = {"shard_train": 200, "head_train": 200}
    kinds = [k for k in args.kinds.split(",") if k]
    pairs = [tuple(p.split("+")) for p in args.pairs.split(",") if p]
    props = [p for p in args.properties.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    data_dir, work = Path(args.data), Path(args.work)
    store = build_store(work, Path(args.store), data_dir, kinds, train)
    if not (evaluator_dir(store.root) / "evaluator.json").exists():
        build_evaluator(store.root, data_dir / "heldout", seed=args.seed)
    t_train = time.perf_counter() - t0
    planted_ids = ["mallory", *kinds]
    cases = {p: (p,) for p in planted_ids} | {"+".join(p): p for p in pairs}
    case_players = {name: tuple(sorted((*HONEST, *pl))) for name, pl in cases.items()}
    needed = sorted({c for players in [HONEST, *case_players.values()]
                     for c in all_coalitions(players)}, key=lambda c: (len(c), sorted(c)))
    settings = {"n": args.n, "steps": args.steps, "seed": args.seed, "scheduler": "ddpm"}
    counts = {}
    game_values = {}  # {case or "honest": {property: {method: values}}}
    t1 = time.perf_counter()
    for i, prop in enumerate(props):
        kwargs = {"store_root": str(store.root), "property": prop, **settings}
        source = CompositionUtility(**kwargs)
        # the first property samples every coalition (in workers); the others reuse the samples
        u = CachedUtility(source, store_cache(store), args.workers if i == 0 else 1,
                          (CompositionUtility, kwargs), progress=True)
        try:
            u.many(needed)
        finally:
            u.close()
        counts[prop] = {"computed": u.evaluations, "cached": u.hits}
        print(f"{prop}: {u.evaluations} coalitions computed, {u.hits} cached "
              f"({time.perf_counter() - t1:.0f} s so far)", flush=True)
        for name, players in tqdm([("honest", HONEST), *case_players.items()],
                                  desc=f"values {prop}", leave=False):
            game_values.setdefault(name, {})[prop] = values_of(SubsetUtility(u, players), methods,
                                                               args.alpha, args.beta)
    t_value = time.perf_counter() - t1
    honest_game = game_values.pop("honest")
    table = summarise({name: (cases[name], vals) for name, vals in game_values.items()},
                      honest_game, props, methods)
    result = {"command": "python benchmarks/detect.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "store": str(store.root), "settings": settings, "honest": list(HONEST),
              "cases": {k: list(v) for k, v in cases.items()}, "properties": props,
              "methods": methods, "alpha": args.alpha, "beta": args.beta,
              "coalitions": {"needed": len(needed), **counts[props[0]], "by_property": counts},
              "seconds": {"build": t_train, "valuation": t_value,
                          "total": time.perf_counter() - t0},
              "honest_game": honest_game, "table": table}
    out = Path(args.out)
    write_outputs(out, result)
    print((out / "table.md").read_text())
    print(f"wrote {out}/detect.json, table.md, detect.png")


if __name__ == "__main__":
    main()
