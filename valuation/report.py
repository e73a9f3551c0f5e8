"""Comparing valuation methods: correlations, LDS, counterfactual removal, cost; and
the report files (report.json, report.md, PNG plots).

LDS (linear datamodeling score, Park et al. 2023; used by Lin et al.): for random
coalitions S_1..S_m of half the players, the Spearman correlation between the
additive prediction sum_{i in S_j} phi_i and the measured U(S_j).

Counterfactual: remove the k players a method values most and measure U(N \\ top_k);
a method that finds the valuable players shows the largest drop U(N) - U(N \\ top_k).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from scipy import stats

from .result import ValuationResult


def correlations(results: dict[str, ValuationResult]) -> dict:
    """Pearson and Spearman between every pair of methods (same players)."""
    out = {}
    for a, b in itertools.combinations(results, 2):
        x, y = results[a].values, results[b].values
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        out[f"{a} vs {b}"] = {"pearson": float(stats.pearsonr(x, y)[0]),
                              "spearman": float(stats.spearmanr(x, y)[0])}
    return out


def half_size_coalitions(players: list[str], m: int, seed: int) -> list[frozenset]:
    """Up to `m` distinct random coalitions of size floor(n/2) or ceil(n/2)."""
    n = len(players)
    sizes = sorted({n // 2, (n + 1) // 2} - {0, n}) or [max(1, n // 2)]
    pool = [frozenset(c) for k in sizes for c in itertools.combinations(players, k)]
    rng = np.random.default_rng(seed)
    if len(pool) > m:
        pool = [pool[i] for i in sorted(rng.choice(len(pool), size=m, replace=False))]
    return pool


def lds(result: ValuationResult, coalitions: list[frozenset], measured: list[float]) -> float:
    predicted = [sum(result[c] for c in s) for s in coalitions]
    if np.ptp(predicted) == 0 or np.ptp(measured) == 0:
        return float("nan")
    return float(stats.spearmanr(predicted, measured)[0])


LDS_FRACTIONS = (0.25, 0.5, 0.75)


def heldout_coalitions(players: list[str], used: set[frozenset], m: int, seed: int,
                       fraction: float) -> list[frozenset]:
    """Up to `m` random coalitions of size round(fraction * n) (kept within 1..n-1)
    that an estimator did not evaluate (`used`); empty when it used them all."""
    n = len(players)
    k = min(max(1, round(fraction * n)), max(1, n - 1))
    rng = np.random.default_rng([seed, int(fraction * 1000)])
    pool = [c for c in (frozenset(x) for x in itertools.combinations(players, k)) if c not in used]
    if len(pool) > m:
        pool = [pool[i] for i in sorted(rng.choice(len(pool), size=m, replace=False))]
    return pool


def summarise(scores: list[float], level: float = 0.95) -> dict:
    """Mean of the finite `scores` with a t-interval over them (None when < 2)."""
    x = np.asarray([v for v in scores if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "ci": None, "n": 0}
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "ci": [mean - half, mean + half], "n": int(len(x))}


def top_k_removals(result: ValuationResult, k_max: int) -> list[frozenset]:
    """N minus the top-k players by value, k = 1..k_max (ties broken by id)."""
    order = sorted(result.players, key=lambda c: (-result[c], c))
    full = frozenset(result.players)
    return [full - frozenset(order[:k]) for k in range(1, min(k_max, len(order) - 1) + 1)]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_values(results: dict[str, ValuationResult], path: Path, title: str) -> None:
    plt = _pyplot()
    players = next(iter(results.values())).players
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(players), 4))
    width = 0.8 / len(results)
    x = np.arange(len(players))
    for j, (name, r) in enumerate(results.items()):
        scale = max(np.abs(r.values).max(), 1e-12)
        ax.bar(x + j * width, r.values / scale, width, yerr=r.stderr / scale, label=name,
               capsize=2)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x + 0.4 - width / 2, players)
    ax.set_ylabel("phi / max |phi| of the method")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scatter(results: dict[str, ValuationResult], reference: str, path: Path) -> None:
    plt = _pyplot()
    others = [m for m in results if m != reference]
    if not others:
        return
    cols = min(3, len(others))
    rows = -(-len(others) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(others):]:
        ax.axis("off")
    ref = results[reference]
    for ax, name in zip(axes.flat, others, strict=False):
        r = results[name]
        ax.errorbar(ref.values, r.values, xerr=ref.stderr, yerr=r.stderr, fmt="o", ms=4)
        for c, xv, yv in zip(ref.players, ref.values, r.values, strict=True):
            ax.annotate(c, (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{reference} phi")
        ax.set_ylabel(f"{name} phi")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, results: dict[str, ValuationResult], folder: str | Path) -> Path:
    """report.json, report.md, values.png and scatter.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    prop = report["property"]
    plot_values(results, folder / "values.png", f"{prop}: Shapley value by method")
    plot_scatter(results, report["reference"], folder / "scatter.png")
    (folder / "report.md").write_text(markdown(report))
    return folder


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4g}"


def markdown(report: dict) -> str:
    methods = report["methods"]
    players = report["players"]
    lines = [f"# Valuation of `{report['store']}`: {report['property']}", "",
             f"Settings: {json.dumps(report['settings'])}", "",
             f"U(empty set) is {report['u_empty_definition']}", "",
             "## Values (phi +- stderr)", "",
             "| contributor | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for c in players:
        cells = [f"{_fmt(methods[m]['values'][c])} +- {_fmt(methods[m]['stderr'][c])}"
                 for m in methods]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Cost: *coalitions* is how many distinct U(S) a method used; *computed* how "
              "many of them this run computed (the rest came from the cache or from an "
              "earlier method of the run); *compute s* is what computing those U(S) cost, "
              "whenever it happened (summed over coalitions; with several workers this "
              "exceeds wall-clock); *run s* is this run's wall-clock for the method.", "",
              "| method | utility | U(N) | U(empty) | efficiency gap | coalitions | computed | "
              "compute s | run s |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in methods.items():
        lines.append(f"| {m} | {r.get('utility', '')} | {_fmt(r['u_full'])} | "
                     f"{_fmt(r['u_empty'])} | {r['efficiency_gap']:.2e} | {r['evaluations']} | "
                     f"{r.get('computed', r['evaluations'])} | "
                     f"{r.get('compute_seconds', 0.0):.1f} | {r['seconds']:.1f} |")
    lines += ["", "## Agreement between methods", "", "| pair | Pearson | Spearman |",
              "|---|---|---|"]
    lines += [f"| {k} | {_fmt(v['pearson'])} | {_fmt(v['spearman'])} |"
              for k, v in report["correlations"].items()]
    for target, block in report["lds"].items():
        lines += ["", f"## LDS against measured U of `{target}` "
                  f"({block['coalitions']} half-size coalitions)", "",
                  "| method | LDS |", "|---|---|"]
        lines += [f"| {m} | {_fmt(v)} |" for m, v in block["scores"].items()]
    if report.get("lds_heldout"):
        lines += ["", "## Held-out LDS against the composition", "",
                  "Coalitions of 0.25, 0.5 and 0.75 of N that the method did not evaluate, "
                  "3 seeds; mean Spearman over the (seed, size) runs with a 95% t-interval. "
                  "A method that evaluated every coalition has none (in-sample only).", "",
                  "| method | held-out LDS | 95% interval | runs |", "|---|---|---|---|"]
        for m, v in report["lds_heldout"].items():
            ci = f"[{_fmt(v['ci'][0])}, {_fmt(v['ci'][1])}]" if v["ci"] else "-"
            mean = _fmt(v["mean"]) if v["mean"] is not None else "in-sample only"
            lines.append(f"| {m} | {mean} | {ci} | {v['n']} |")
    for target, block in report["counterfactual"].items():
        lines += ["", f"## Counterfactual: remove the top-k, measured U of `{target}` "
                  f"(U(N) = {_fmt(block['u_full'])})", "",
                  "| method | " + " | ".join(f"k={k}: removed, drop" for k in block["k"]) + " |",
                  "|---|" + "---|" * len(block["k"])]
        for m, rows in block["methods"].items():
            lines.append(f"| {m} | " + " | ".join(
                f"{','.join(r['removed'])}: {_fmt(r['drop'])}" for r in rows) + " |")
    lines += ["", "![values](values.png)", "", "![scatter](scatter.png)", ""]
    return "\n".join(lines)
