"""Evidence for the core issue, on the default store. Prints measured numbers and
writes benchmarks/results/<store>/core_evidence.json and sample grids; it does not pass
or fail.

1. Restricted to one contributor: share of samples that a digits classifier trained
   on the held-out digits puts in that contributor's digit classes.
2. All shards composed vs naive averaging vs one monolithic UNet (same architecture,
   trained on the union of all contributors' data with as many steps as all shards
   together): Frechet distance to held-out digits in that classifier's feature space.
3. Restricted to {alice, bob} (disjoint digits): share of samples whose largest
   attribution goes to the owner of the digit the sample shows.

    python benchmarks/core_evidence.py --data var/demo-data --store var/store
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from evaluator import DigitsEvaluator, pair_attribution  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.images import save_grid  # noqa: E402
from shards.models import make_unet  # noqa: E402
from shards.training import TrainConfig, train_denoiser  # noqa: E402
from valuation.monolith import single_model_sampler  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/demo-data")
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--n", type=int, default=1000, help="samples for the Frechet distances")
    parser.add_argument("--n-single", type=int, default=200, help="samples per single contributor")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None,
                        help="output folder (default: benchmarks/results/<store folder name>)")
    args = parser.parse_args()
    results = Path(args.results) if args.results else RESULTS / Path(args.store).name
    results.mkdir(parents=True, exist_ok=True)
    owners = json.loads((Path(args.data) / "owners.json").read_text())["contributors"]
    store = ShardStore.open(args.store)
    sampler = store.load_sampler("cpu")

    evaluator = DigitsEvaluator(Path(args.data) / "heldout", seed=args.seed)
    classify, fd, acc = evaluator.classify, evaluator.fd, evaluator.accuracy
    report: dict = {"evaluator_holdout_accuracy": acc, "steps": args.steps, "seed": args.seed}
    print(f"evaluator accuracy on 20% of held-out digits (fit on the other 80%): {acc:.3f}")

    # 1. single-contributor restriction
    single = {}
    for cid in store.contributor_ids:
        out = sampler([cid], n=args.n_single, steps=args.steps, seed=args.seed)  # DDPM
        share = float(np.isin(classify(out.images), owners[cid]["classes"]).mean())
        single[cid] = share
        save_grid(out.images[:64], results / f"single_{cid}.png")
        print(f"restricted to {cid:8s}: {share:6.1%} of samples in its digits {owners[cid]['classes']}")
    report["single_contributor_share"] = single

    # 2. composed vs naive vs monolithic, under each sampler
    union = torch.cat([store.contributor_images(c) for c in store.contributor_ids])
    cfg = store.config
    mono_steps = cfg.shard_train.steps * len(store.contributor_ids)
    mono = make_unet(store.image_shape, cfg.unet, seed=args.seed)
    t0 = time.perf_counter()
    mono_loss = train_denoiser(mono, union, store.noise_schedule(),
                               TrainConfig(**{**cfg.shard_train.to_dict(), "steps": mono_steps}),
                               args.seed, desc="monolithic")
    report.update(monolithic_steps=mono_steps, monolithic_final_loss=mono_loss,
                  monolithic_train_s=time.perf_counter() - t0,
                  frechet_real_union=fd((union + 1) / 2), frechet={}, final_mass={})
    mono_sampler = single_model_sampler(mono, sampler.schedule_config, store.image_shape)
    low = [c for c in store.contributor_ids if owners[c].get("corrupted")]
    priors = store.priors()
    for scheduler in ("ddpm", "ddim"):
        t0 = time.perf_counter()
        composed = sampler(None, n=args.n, steps=args.steps, seed=args.seed, scheduler=scheduler)
        t_composed = time.perf_counter() - t0
        naive = sampler(None, n=args.n, steps=args.steps, seed=args.seed, scheduler=scheduler,
                        mode="naive")
        mono_images = mono_sampler(None, n=args.n, steps=args.steps, seed=args.seed,
                                   scheduler=scheduler).images
        fds = {"composed": fd(composed.images), "naive": fd(naive.images),
               "monolithic": fd(mono_images), "composed_sample_s": t_composed}
        report["frechet"][scheduler] = fds
        report["final_mass"][scheduler] = {
            c: {"prior": priors[c] / sum(priors.values()),
                "final_step_mass": float(composed.attribution_last[:, i].mean())}
            for i, c in enumerate(composed.contributor_ids)}
        for name, imgs in [("composed", composed.images), ("naive", naive.images),
                           ("monolithic", mono_images)]:
            save_grid(imgs[:100], results / f"all_{scheduler}_{name}.png", ncol=10)
        rel = fds["composed"] / fds["monolithic"] - 1
        print(f"[{scheduler} {args.steps} steps] Frechet distance to held-out ({args.n} samples): "
              f"composed {fds['composed']:.3f}, naive {fds['naive']:.3f}, monolithic "
              f"{fds['monolithic']:.3f} (composed vs monolithic {rel:+.1%}); real union "
              f"{report['frechet_real_union']:.3f}")
        for c in low:
            m = report["final_mass"][scheduler][c]
            print(f"[{scheduler}] final-step attribution mass of {c}: {m['final_step_mass']:.3f} "
                  f"(prior {m['prior']:.3f})")

    # 3. attribution on {alice, bob}
    pair = ["alice", "bob"]
    out = sampler(pair, n=args.n_single * 2, steps=args.steps, seed=args.seed)
    report["pair_attribution"] = pair_attribution(
        evaluator, out, {c: owners[c]["classes"] for c in pair})
    pa = report["pair_attribution"]
    print(f"{{alice, bob}}: largest attribution on the digit's owner for {pa['argmax_is_owner']:.1%} "
          f"of samples; mean attribution mass on the owner {pa['mean_mass_on_owner']:.3f}")
    (results / "core_evidence.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {results}/core_evidence.json and sample grids")


if __name__ == "__main__":
    main()
