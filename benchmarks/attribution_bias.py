"""Where composed samples' attribution departs from the contributors' shares, and why.
Prints measured numbers and writes benchmarks/results/attribution_bias/<store>.json;
it does not pass or fail.

On a labelled store with router `heads` and its contributors' data kept (the studios'
label-conditional store), with pi the priors (each contributor's share of the images)
and the posterior w = softmax(r + log lambda(y)) of every contributor (eq. 6):

  calibration  the router on real images. Every contributor's own images (so the
               mixture in its proportions) noised at t in T: the mean posterior per
               contributor, which equals pi at every t for a calibrated router (the
               heads saw these images); and the held-out drawings of each studio
               (--data; concepts no head saw): the mean posterior by source studio.
  shards       --n-alone samples of each shard alone (its own labels), re-noised at
               t = --t-read: C[j], the router's mean posterior on shard j's images.
  composed     --n samples over all contributors per seed (the default routing),
               --seeds seeds: the trajectory-mean attribution, and the router's
               reading of the final images at --t-read against pi @ C, what it reads
               on samples of the shards' own mixture (each sample shard j's with
               probability pi_j). The gap is what composition adds: were the
               composed sampler the mixture of the shards, they would agree.
  --model-heads  the same composed runs (same seeds) with heads trained on the
               shards' own samples instead of the contributors' images (the store's
               head recipe and reference): heads of q_j / p_ref, q_j the shard's
               model distribution, whose posterior is the one under which the mixture
               score is the mixture of the shards' own marginals.
Each composed run's FD to the held-out drawings (the category evaluator of
benchmarks/evaluator.py) is recorded beside its attribution.

    .venv/bin/python benchmarks/attribution_bias.py --store var/studios-store \\
        --data var/studios-data --seeds 5 --model-heads
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from evaluator import DigitsEvaluator  # noqa: E402
from router_trunk import heldout, train_router  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from studios import run  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.heads import StackedHeads  # noqa: E402
from shards.routing import posterior_weights  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "attribution_bias"
T = (100, 250, 400, 550, 700, 850, 950)


class Reader:
    """The router's posterior over all contributors on images noised at t."""

    def __init__(self, sampler, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.scheduler = DDPMScheduler(**sampler.schedule_config)
        self.log_prior = torch.log(sampler.label_prior.T.float())  # (L, K)

    def posterior(self, router, x0: torch.Tensor, y: torch.Tensor, t: int) -> torch.Tensor:
        """(B, K) posteriors of images `x0` in [-1, 1] with labels `y`, noised at t."""
        noise = torch.randn(x0.shape, generator=self.g)
        x_t = self.scheduler.add_noise(x0, noise, torch.full((len(x0),), t))
        with torch.no_grad():
            r = torch.cat([router.log_ratios(x_t[i:i + 1000], torch.tensor(t), y[i:i + 1000])
                           for i in range(0, len(x0), 1000)])
        log_prior = self.log_prior[y]
        return posterior_weights(r, log_prior, torch.isfinite(log_prior))


def part_calibration(store: ShardStore, sampler, reader: Reader, data: Path | None) -> dict:
    ids = sampler.classifier_ids
    kept = {c: load_file(str(store.root / store.contributor(c)["data_path"] / "images.safetensors"))
            for c in ids}
    x = torch.cat([kept[c]["images"] for c in ids])
    y = torch.cat([kept[c]["labels"] for c in ids])
    out = {"own_images": {}, "heldout": {}}
    for t in T:
        w = reader.posterior(sampler.router, x, y, t).mean(0)
        out["own_images"][t] = dict(zip(ids, w.tolist(), strict=True))
        print(f"[calibration] own images, t={t:3d}: " + fmt(ids, w), flush=True)
    if data is not None:
        hx, hy, studio = heldout(data, ids)  # the contributors' held-out drawings
        if int(hy.max()) >= sampler.num_labels:
            raise SystemExit(f"{data}: a held-out label is not one of the store's {sampler.num_labels}")
        for t in T:
            w = reader.posterior(sampler.router, hx, hy, t)
            out["heldout"][t] = {ids[k]: dict(zip(ids, w[studio == k].mean(0).tolist(), strict=True))
                                 for k in sorted(set(studio.tolist()))}
            for s, row in out["heldout"][t].items():
                print(f"[calibration] held-out {s:14s} t={t:3d}: "
                      + fmt(ids, torch.tensor(list(row.values()))), flush=True)
    return out


def fmt(ids: list[str], w: torch.Tensor) -> str:
    return " ".join(f"{c} {v:.3f}" for c, v in zip(ids, w.tolist(), strict=True))


def alone_samples(sampler, n: int, steps: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`n` samples of each shard alone, in [-1, 1], with their labels."""
    got = {}
    for c in sampler.classifier_ids:
        outs = [run(sampler, [c], min(200, n - b), 100 + b, steps) for b in range(0, n, 200)]
        got[c] = (torch.cat([o.images for o in outs]) * 2 - 1, torch.cat([o.labels for o in outs]))
    return got


def model_heads(store: ShardStore, got: dict) -> StackedHeads:
    """A head per contributor trained on its shard's samples against the reference, by
    the store's head recipe (its steps, width, trunk and seeds)."""
    samples = [SimpleNamespace(contributor_id=c, images=x, labels=y) for c, (x, y) in got.items()]
    heads, trunk = train_router(store, samples, store.config.head_trunk, store.config.head_hidden)
    return StackedHeads(heads, trunk=trunk)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="var/studios-store")
    parser.add_argument("--data", default="var/studios-data", help="'' skips the held-out part")
    parser.add_argument("--n", type=int, default=400, help="composed samples per seed")
    parser.add_argument("--n-alone", type=int, default=600, help="samples of each shard alone")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--t-read", type=int, default=100, help="t at which the router reads final images")
    parser.add_argument("--model-heads", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    store = ShardStore.open(args.store)
    if store.config.router != "heads" or not store.num_labels or not store.config.keeps_data:
        raise SystemExit(f"{args.store}: needs a labelled store with router heads and its data kept")
    sampler = store.load_sampler("cpu")
    ids, reader, start = sampler.classifier_ids, Reader(sampler), time.time()
    pi = torch.tensor([store.priors()[c] for c in ids], dtype=torch.float32)
    pi = pi / pi.sum()
    print("[priors] " + fmt(ids, pi), flush=True)
    result = {"store": args.store, "contributors": ids, "priors": pi.tolist(), "t_read": args.t_read,
              "calibration": part_calibration(store, sampler, reader, Path(args.data) if args.data else None)}
    got = alone_samples(sampler, args.n_alone, args.steps)
    data_router = sampler.router
    C = torch.stack([reader.posterior(data_router, x, y, args.t_read).mean(0) for x, y in got.values()])
    for c, row in zip(ids, C, strict=True):
        print(f"[shards] the router on {c}'s samples: " + fmt(ids, row), flush=True)
    expected = pi @ C
    print("[shards] expected on the shards' mixture (pi @ C): " + fmt(ids, expected), flush=True)
    result["shards"] = {"C": C.tolist(), "expected": expected.tolist()}
    routers = {"data heads": data_router}
    if args.model_heads:
        routers["model heads"] = model_heads(store, got)
    judge = DigitsEvaluator(Path(args.data) / "heldout") if args.data else None
    result["composed"] = {}
    for name, router in routers.items():
        sampler.router, traj, read, fds = router, [], [], []
        for seed in range(args.seeds):
            out = run(sampler, None, args.n, seed, args.steps)
            traj.append(out.attribution_mean.mean(0))
            read.append(reader.posterior(data_router, out.images * 2 - 1, out.labels, args.t_read).mean(0))
            fds.append(judge.fd(out.images) if judge else float("nan"))
            print(f"[composed] {name}, seed {seed}: FD {fds[-1]:.3f}; trajectory "
                  f"{fmt(ids, traj[-1])}; read {fmt(ids, read[-1])}", flush=True)
        read_t = torch.stack(read)
        mean, se = read_t.mean(0), read_t.std(0) / len(read) ** 0.5
        tv = float(0.5 * (mean - expected).abs().sum())
        result["composed"][name] = {"trajectory": torch.stack(traj).tolist(), "read": read_t.tolist(),
                                    "read_mean": mean.tolist(), "read_se": se.tolist(), "fd": fds,
                                    "total_variation_from_expected": tv}
        print(f"[composed] {name}: read, mean +- se over {args.seeds} seeds: "
              + " ".join(f"{c} {m:.3f}+-{e:.3f}" for c, m, e in zip(ids, mean.tolist(), se.tolist(), strict=True))
              + f"; total variation from pi @ C {tv:.3f}; FD {torch.tensor(fds).mean():.3f} +- "
              f"{torch.tensor(fds).std() / len(fds) ** 0.5:.3f}", flush=True)
    result["seconds"] = time.time() - start
    out_path = Path(args.out) if args.out else RESULTS / f"{Path(args.store).name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
