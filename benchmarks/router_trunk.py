"""The heads' shared trunk (shards/trunk.py): what it saves and what it costs in
routing quality. Prints measured numbers and writes
benchmarks/results/router_trunk/<store>.json; it does not pass or fail.

On a store with router `heads` (the studios' label-conditional store by default), for
each variant F:H in --variants (a trunk of F features, 0: none, the heads read the
pooled pixels; heads H wide, the store's 128 by default), the trunk is fit on the store's public reference and every contributor's head trained
on its own images against it (the store's head steps and seeds, in this process, so
the variants differ only in F and H); then
  * cost: milliseconds the stacked heads take for 100 rows at K = N, 32 and 128 heads
    (heads beyond N are copies: the cost does not depend on the weights), against one
    shard's pass of 100 rows in the same run;
  * routing quality on the held-out drawings of each studio (concepts no head saw),
    noised at t in T: the share routed to their studio first (top-1 of the posterior
    with the priors, eq. 6) and the mean -log posterior of their studio;
  * FD of composed samples (the default routing, --steps DDPM steps, --n samples over
    all contributors) to the held-out drawings in the category classifier's features
    (benchmarks/evaluator.py), mean and standard error over --seeds seeds; dense
    composition once as the reference (the router weighs every shard there too).

    .venv/bin/python benchmarks/router_trunk.py --data var/studios-data \
        --store var/studios-store --variants 0:128,64:128,64:64,32:64
    .venv/bin/python benchmarks/router_trunk.py --store var/studios-store --cost-only 7
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from evaluator import DigitsEvaluator  # noqa: E402
from studios import _image, sample  # noqa: E402

from shards import ShardStore, load_contributors  # noqa: E402
from shards.heads import DensityRatioHead, HeadsRouter, StackedHeads, train_head  # noqa: E402
from shards.models import seeded  # noqa: E402
from shards.routing import Routing  # noqa: E402
from shards.sampler import compose  # noqa: E402
from shards.shard import derived_seed  # noqa: E402
from shards.trunk import PublicTrunk, fit_for, head_width  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "router_trunk"
T = (50, 250, 500, 750, 950)


def train_router(store: ShardStore, datasets, features: int, hidden: int
                 ) -> tuple[list[DensityRatioHead], PublicTrunk | None]:
    """Every contributor's head as the store trains it, `hidden` wide, reading a trunk of
    `features`."""
    reference, reference_labels = HeadsRouter.reference(store)
    trunk = fit_for(reference, features)
    heads = []
    for data in datasets:
        seed = derived_seed(store.config.seed, "head", data.contributor_id)
        with seeded(seed):
            head = DensityRatioHead(
                contributor_id=data.contributor_id, hidden=hidden,
                in_features=head_width(store.image_shape, trunk),
                num_labels=store.num_labels)
        train_head(head, data.images, reference, store.noise_schedule(), store.config.head_train,
                   seed, labels=data.labels, reference_labels=reference_labels, trunk=trunk,
                   progress=False)
        heads.append(head.eval())
    return heads, trunk


def heldout(data: Path, studios: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out drawings of `studios`: images, labels (their folder) and studio index."""
    with open(data / "concepts.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "heldout" and r["studio"] in studios]
    images = torch.cat([_image(data / r["file"]) for r in rows])
    labels = torch.tensor([int(Path(r["file"]).parent.name) for r in rows])
    return images, labels, torch.tensor([studios.index(r["studio"]) for r in rows])


def routing_quality(router: StackedHeads, store: ShardStore, images, labels, owners) -> dict:
    """Per t: share of held-out drawings whose studio is first, mean -log p(studio)."""
    ids = router.contributor_ids
    counts = torch.tensor([[store.label_counts(c).get(y, 0) for y in range(store.num_labels)]
                           for c in ids], dtype=torch.float64)
    log_prior = (counts / counts.sum(0, keepdim=True)).log().T.float()  # (labels, K)
    scheduler = store.noise_schedule()
    generator = torch.Generator().manual_seed(0)
    out = {}
    for t in T:
        hits, nll = [], []
        for _ in range(4):  # noise draws
            noise = torch.randn(images.shape, generator=generator)
            x_t = scheduler.add_noise(images, noise, torch.full((len(images),), t))
            with torch.no_grad():
                logits = router.log_ratios(x_t, torch.tensor(t), labels) + log_prior[labels]
            logp = logits.log_softmax(1)
            hits.append((logits.argmax(1) == owners).float().mean().item())
            nll.append(-logp[torch.arange(len(owners)), owners].mean().item())
        out[str(t)] = {"top1": float(np.mean(hits)), "nll": float(np.mean(nll))}
    return out


def ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def router_cost(heads: list[DensityRatioHead], trunk, store: ShardStore) -> dict:
    x = torch.randn(100, *store.image_shape)
    t, y = torch.tensor(500), torch.randint(0, max(store.num_labels, 1), (100,))
    y = y if store.num_labels else None
    out = {}
    for k in sorted({len(heads), 32, 128}):
        stacked = StackedHeads([heads[i % len(heads)] for i in range(k)], trunk)
        with torch.no_grad():
            out[str(k)] = ms(lambda s=stacked: s.log_ratios(x, t, y))
    return out


def cost_table(store: ShardStore, variants: list[str], rounds: int) -> dict:
    """The cost alone, untrained heads (a pass costs the same whatever the weights):
    median ms for 100 rows over `rounds` rounds, the variants and one shard's pass
    interleaved in each, so a busy moment weighs on all alike."""
    reference, _ = HeadsRouter.reference(store)
    ids, n = store.contributor_ids, len(store.contributor_ids)
    stacks = {}
    for variant in variants:
        features, hidden = (int(v) for v in variant.split(":"))
        trunk = fit_for(reference, features)
        width = head_width(store.image_shape, trunk)
        heads = [DensityRatioHead(contributor_id=f"h{i}", in_features=width, hidden=hidden,
                                  num_labels=store.num_labels) for i in range(128)]
        for k in sorted({n, 32, 128}):
            stacks[(variant, k)] = StackedHeads(heads[:k], trunk)
    bank, x = store.load_bank(), torch.randn(100, *store.image_shape)
    t = torch.tensor(500)
    y = torch.randint(0, store.num_labels, (100,)) if store.num_labels else None
    times: dict = {key: [] for key in [*stacks, "shard"]}
    with torch.no_grad():
        for _ in range(rounds):
            times["shard"].append(ms(lambda: bank.evaluate(x, t.expand(100), [ids[0]] * 100, y), 5))
            for key, stacked in stacks.items():
                times[key].append(ms(lambda s=stacked: s.log_ratios(x, t, y)))
    shard = float(np.median(times["shard"]))
    out = {"shard_ms_100_rows": shard, "rounds": rounds, "variants": {}}
    for variant, k in stacks:
        med = float(np.median(times[(variant, k)]))
        out["variants"].setdefault(variant, {})[str(k)] = {"ms": med, "vs_shard": med / shard}
        print(f"F:H={variant} K={k}: {med:.2f} ms / 100 rows, {med / shard:.3f}x one shard "
              f"({shard:.1f} ms)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/studios-data")
    parser.add_argument("--store", default="var/studios-store")
    parser.add_argument("--variants", default="0:128,64:128,64:64,32:64",
                        help="F:H pairs: trunk features (0: none) and head width")
    parser.add_argument("--n", type=int, default=300, help="samples per seed for FD")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cost-only", type=int, default=0, metavar="ROUNDS",
                        help="measure only the cost, untrained heads, over ROUNDS rounds")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("CDM_THREADS", "2")))
    data, store = Path(args.data), ShardStore.open(args.store)
    if store.config.router != "heads" or store.text or not store.num_labels:
        parser.error("the store must have router 'heads' and labels (cdm train --no-text)")
    if args.cost_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{Path(args.store).name}-cost.json"
        out.write_text(json.dumps(cost_table(store, args.variants.split(","), args.cost_only),
                                  indent=1))
        print(f"wrote {out}")
        return 0
    ids = store.contributor_ids
    datasets = [d for d in load_contributors(data / "contributors") if d.contributor_id in ids]
    images, labels, owners = heldout(data, ids)
    judge = DigitsEvaluator(data / "heldout")
    bank, one = store.load_bank(), torch.randn(100, *store.image_shape)
    with torch.no_grad():  # one shard's pass of 100 rows: the unit of the router's cost
        shard_ms = ms(lambda: bank.evaluate(one, torch.full((100,), 500), [ids[0]] * 100,
                                            labels[:100]), repeats=5)
    results = {"store": str(args.store), "contributors": ids, "heldout": len(images),
               "n": args.n, "seeds": args.seeds, "steps": args.steps, "shard_ms_100_rows": shard_ms,
               "variants": {}}
    dense = Routing.parse("dense", None, None, "composed")
    for variant in args.variants.split(","):
        features, hidden = (int(v) for v in variant.split(":"))
        start = time.perf_counter()
        heads, trunk = train_router(store, datasets, features, hidden)
        train_s = time.perf_counter() - start
        router = StackedHeads(heads, trunk)
        sampler = compose(bank, dict(store.noise_schedule().config), store.image_shape,
                          router, store.priors(), {c: store.label_counts(c) for c in ids},
                          store.num_labels)
        row = {"train_s": train_s, "cost_ms_100_rows": router_cost(heads, trunk, store),
               "quality": routing_quality(router, store, images, labels, owners), "fd": []}
        for seed in range(args.seeds):
            row["fd"].append(judge.fd(sample(sampler, None, args.n, 1000 + seed, args.steps)))
        if variant == args.variants.split(",")[0]:
            row["fd_dense"] = [judge.fd(sample(sampler, None, args.n, 1000 + s, args.steps, dense))
                               for s in range(args.seeds)]
        for key in [k for k in ("fd", "fd_dense") if k in row]:
            v = row[key]
            row[key + "_mean"] = float(np.mean(v))
            row[key + "_se"] = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        results["variants"][variant] = row
        q = row["quality"]
        print(f"F:H={variant}: heads {train_s:.0f} s; ms/100 rows (one shard {shard_ms:.1f}) "
              + ", ".join(f"K={k} {v:.2f}" for k, v in row["cost_ms_100_rows"].items())
              + "; top1 " + ", ".join(f"t{t} {q[t]['top1']:.3f}" for t in q)
              + "; nll " + ", ".join(f"t{t} {q[t]['nll']:.3f}" for t in q)
              + f"; FD {row['fd_mean']:.3f} +- {row['fd_se']:.3f}"
              + (f" (dense {row['fd_dense_mean']:.3f} +- {row['fd_dense_se']:.3f})"
                 if "fd_dense" in row else ""), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{Path(args.store).name}.json"
        out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
