"""One valuation run: the methods asked for (methods.py), on the utilities they need,
compared in one report. Used by `cdm value` and by the service's `value` job.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from shards import ShardStore
from shards.errors import DataError
from shards.settings import METHODS, VALUATION
from shards.training import TrainConfig

from . import report as rpt
from .cache import store_cache
from .methods import method
from .monolith import PrunedFinetuneUtility, RetrainUtility
from .properties import build_evaluator, evaluator_dir
from .result import ValuationResult
from .stopping import StoppingRule
from .utility import CachedUtility, CompositionUtility

TRUTH_UTILITIES = ("composition", "retrain")
U_EMPTY = ("the property of the prior's samples: the common initial noise x_T ~ N(0, I), "
           "clipped to [-1, 1] (what the sampler returns with no denoiser), for every method.")


@dataclass
class ValuationSettings:
    """Everything a valuation run depends on besides the store; defaults from
    shards/settings.py VALUATION."""

    property: str = VALUATION["property"]
    methods: tuple[str, ...] = VALUATION["methods"]
    n: int = VALUATION["n"]
    steps: int = VALUATION["steps"]
    seed: int = VALUATION["seed"]
    scheduler: str = VALUATION["scheduler"]
    workers: int = VALUATION["workers"]
    max_exact: int = VALUATION["max_exact"]
    max_evaluations: int = VALUATION["max_evaluations"]
    stderr_tol: float = VALUATION["stderr_tol"]
    pruning_ratio: float = VALUATION["pruning_ratio"]
    monolith_steps: int = VALUATION["monolith_steps"]
    finetune_steps: int = VALUATION["finetune_steps"]
    subset_steps: int = VALUATION["subset_steps"]
    retrain_steps: int = VALUATION["retrain_steps"]
    lds_coalitions: int = VALUATION["lds_coalitions"]
    top_k: int = VALUATION["top_k"]
    alpha: float = VALUATION["alpha"]  # beta-shapley: Beta(alpha, beta) over coalition sizes
    beta: float = VALUATION["beta"]
    rank_patience: int = VALUATION["rank_patience"]  # sampled methods: stop once the
    # ranking held this many updates
    ray_address: str | None = None
    aesthetic: dict | None = field(default=None)

    def __post_init__(self):
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods={list(self.methods)}; allowed: {list(METHODS)}")
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"alpha={self.alpha}, beta={self.beta}; allowed: both > 0")
        if self.rank_patience < 0:
            raise ValueError(f"rank_patience={self.rank_patience}; allowed: >= 0")
        if self.n < 2 or self.steps < 1 or self.workers < 1:
            raise ValueError(f"n >= 2, steps >= 1 and workers >= 1 needed: n={self.n}, "
                             f"steps={self.steps}, workers={self.workers}")


def _train(steps: int, warmup: bool = True) -> dict:
    """TrainConfig fields of a `steps`-step run: the default warm-up cut as
    `TrainConfig.with_steps` cuts it, or none."""
    train = TrainConfig().with_steps(steps)
    return (train if warmup else replace(train, warmup_steps=0)).to_dict()


def _sources(store_root: Path, s: ValuationSettings) -> dict[str, tuple[type, dict]]:
    common = {"store_root": str(store_root), "property": s.property, "n": s.n,
              "steps": s.steps, "seed": s.seed, "scheduler": s.scheduler,
              "aesthetic": s.aesthetic}
    return {
        "composition": (CompositionUtility, common),
        "pruned": (PrunedFinetuneUtility, {
            **common, "ratio": s.pruning_ratio, "monolith": _train(s.monolith_steps),
            "finetune": _train(s.finetune_steps), "subset": _train(s.subset_steps, False)}),
        "retrain": (RetrainUtility, {**common, "train": _train(s.retrain_steps)}),
    }


def run_valuation(store_root: str | Path, settings: ValuationSettings,
                  heldout: str | Path | None = None, report_dir: str | Path | None = None,
                  progress: bool = True) -> tuple[dict, dict[str, ValuationResult]]:
    """Run `settings.methods` on the store; returns (report dict, results by method).

    Raises:
        DataError: no evaluator in the store and no `heldout` folder to build one.
        ValueError: bad settings.
    """
    store_root = ShardStore.open(store_root).root  # a clear error if there is no store
    if heldout is not None or not (evaluator_dir(store_root) / "evaluator.json").exists():
        if heldout is None:
            raise DataError(f"store {store_root} has no evaluator: pass the held-out "
                            "digits folder (heldout/<digit>/*.png) to build one")
        build_evaluator(store_root, heldout, seed=settings.seed)
    specs = _sources(store_root, settings)
    needed = {method(m).utility for m in settings.methods} | {"composition"}
    utilities: dict[str, CachedUtility] = {}
    for name in sorted(needed):
        factory, kwargs = specs[name]
        source = factory(**kwargs)
        if isinstance(source, PrunedFinetuneUtility):
            source.progress = progress
            source.prepare()  # steps 1-3 once, before any worker starts
        utilities[name] = CachedUtility(source, store_cache(source.store.root), settings.workers,
                                        (factory, kwargs), progress, settings.ray_address)
    try:
        results, used = _run_methods(utilities, settings, progress)
        report = _compare(store_root, settings, utilities, results, used)
    finally:
        for u in utilities.values():
            u.close()
    if report_dir is not None:
        rpt.write_report(report, results, report_dir)
    return report, results


def _run_methods(utilities: dict[str, CachedUtility], settings: ValuationSettings,
                 progress: bool) -> tuple[dict[str, ValuationResult], dict[str, set]]:
    """Every method's result, and the coalitions each one evaluated."""
    rule = StoppingRule(settings.max_evaluations, settings.stderr_tol,
                        rank_patience=settings.rank_patience)
    results: dict[str, ValuationResult] = {}
    used: dict[str, set[frozenset]] = {}
    for name in settings.methods:
        m = method(name)
        u = utilities[m.utility]
        before = (u.evaluations, u.hits)
        u.touched.clear()
        start = time.perf_counter()
        r = results[name] = m.estimate(u, rule, settings, progress)
        used[name] = set(u.touched)
        r.method, r.seconds = name, time.perf_counter() - start
        r.extra.update(computed=u.evaluations - before[0], cached=u.hits - before[1],
                       utility=m.utility, compute_seconds=sum(u.seconds[c] for c in u.touched))
        if isinstance(u.source, PrunedFinetuneUtility):
            r.extra["pruned_base"] = u.source.prepare()
    return results, used


def _heldout_lds(u: CachedUtility, players: list[str], results: dict[str, ValuationResult],
                 used: dict[str, set], s: ValuationSettings) -> dict:
    """LDS against the composition on coalitions each method did not evaluate, of
    sizes 0.25, 0.5 and 0.75 of N, over 3 seeds: one Spearman per (seed, size), their
    mean and 95% t-interval. A method that evaluated every coalition of a size (exact
    ones) has none there: its LDS would be in-sample."""
    per = max(5, s.lds_coalitions // len(rpt.LDS_FRACTIONS))
    plans = {m: [(seed, f, rpt.heldout_coalitions(players, used.get(m, set()), per, seed, f))
                 for seed in (s.seed, s.seed + 1, s.seed + 2) for f in rpt.LDS_FRACTIONS]
             for m in results}
    needed = sorted({c for plan in plans.values() for _, _, cs in plan for c in cs},
                    key=lambda c: (len(c), sorted(c)))
    measured = dict(zip(needed, u.many(needed), strict=True)) if needed else {}
    out = {}
    for m, plan in plans.items():
        runs = [{"seed": seed, "fraction": f, "coalitions": len(cs),
                 "lds": rpt.lds(results[m], cs, [measured[c] for c in cs]) if len(cs) >= 3
                 else None} for seed, f, cs in plan]
        out[m] = {"runs": runs, **rpt.summarise([r["lds"] for r in runs])}
    return out


def _compare(store_root: Path, s: ValuationSettings, utilities: dict[str, CachedUtility],
             results: dict[str, ValuationResult], used: dict[str, set]) -> dict:
    players = list(utilities["composition"].players)
    reference = "exact" if "exact" in results else next(iter(results))
    halves = rpt.half_size_coalitions(players, s.lds_coalitions, s.seed)
    lds, counterfactual = {}, {}
    for target in TRUTH_UTILITIES:
        if target not in utilities:
            continue
        u = utilities[target]
        measured = u.many(halves)
        lds[target] = {"coalitions": len(halves),
                       "scores": {m: rpt.lds(r, halves, measured) for m, r in results.items()}}
        u_full = u(frozenset(players))
        block = {"u_full": u_full, "k": [], "methods": {}}
        for m, r in results.items():
            rows = []
            for rest in rpt.top_k_removals(r, s.top_k):
                value = u(rest)
                rows.append({"removed": sorted(set(players) - rest), "u": value,
                             "drop": u_full - value})
            block["methods"][m] = rows
            block["k"] = list(range(1, len(rows) + 1))
        counterfactual[target] = block
    heldout = _heldout_lds(utilities["composition"], players, results, used, s)
    return {"store": str(store_root), "property": s.property, "players": players,
            "settings": {k: v for k, v in asdict(s).items() if k != "aesthetic"},
            "u_empty_definition": U_EMPTY, "reference": reference,
            "methods": {m: r.as_dict() for m, r in results.items()},
            "correlations": rpt.correlations(results), "lds": lds, "lds_heldout": heldout,
            "counterfactual": counterfactual}
