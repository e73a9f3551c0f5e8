"""Quality of routed composition and of the two routers on the default store.
Prints measured numbers and writes benchmarks/results/routing/quality.json and sample
grids; it does not pass or fail.

The default store (`make store`: router `heads`, data kept) and a copy of it whose
router is the joint classifier (same shards, bit for bit; the classifier trained
from scratch as `cdm train --router joint` would). For each router:
  * FD of 1,000 composed samples (50 DDPM steps, as core_evidence.py) for dense
    routing, the default routing and top-1, with the sampling time and the shard
    evaluations per sample and step;
  * restricted to one contributor: share of samples in its digits;
  * {alice, bob}: share of samples whose largest attribution is the digit's owner;
  * mallory's (planted low quality) final-step attribution mass against its prior;
  * purge time (forget mallory) and add time (mallory back under a new id).

    python benchmarks/routing_quality.py --data var/demo-data --store var/store
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from evaluator import DigitsEvaluator, pair_attribution  # noqa: E402

from shards import ShardStore, load_contributor  # noqa: E402
from shards.images import save_grid  # noqa: E402
from shards.routing import DEFAULT_ROUTING, Routing  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "routing"
ROUTINGS = {"dense": Routing(), "default": DEFAULT_ROUTING, "top1": Routing("topk", top_k=1)}


def joint_copy(store: ShardStore, dest: Path) -> tuple[ShardStore, float]:
    """The same shards under the joint classifier, trained from scratch on the kept
    data exactly as a store built with router `joint` trains it. Returns it and the
    classifier's training seconds."""
    shutil.copytree(store.root, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["config"]["router"] = "joint"
    for entry in manifest["contributors"].values():
        entry.pop("head", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(dest / "router")
    joint = ShardStore.open(dest)
    start = time.perf_counter()
    update = joint.router.train(joint, "cpu", True)
    with joint.write_lock():
        joint.commit(copy.deepcopy(joint.manifest), update)
    return joint, time.perf_counter() - start


def measure(store: ShardStore, evaluator, owners, args, results: Path, name: str) -> dict:
    sampler = store.load_sampler("cpu")
    priors = store.priors()
    total = sum(priors.values())
    out = {"fd": {}, "sample_s": {}, "rows_per_sample_step": {}, "mallory_final_mass": {},
           "pair_attribution": {}}
    for rname, routing in ROUTINGS.items():
        rows = sampler.shard_rows
        start = time.perf_counter()
        composed = sampler(None, n=args.n, steps=args.steps, seed=args.seed, routing=routing)
        out["sample_s"][rname] = time.perf_counter() - start
        out["rows_per_sample_step"][rname] = (sampler.shard_rows - rows) / (args.n * args.steps)
        out["fd"][rname] = evaluator.fd(composed.images)
        i = composed.contributor_ids.index("mallory")
        out["mallory_final_mass"][rname] = float(composed.attribution_last[:, i].mean())
        save_grid(composed.images[:100], results / f"{name}_{rname}.png", ncol=10)
        pair = sampler(["alice", "bob"], n=2 * args.n_single, steps=args.steps, seed=args.seed,
                       routing=routing)
        out["pair_attribution"][rname] = pair_attribution(
            evaluator, pair, {c: owners[c]["classes"] for c in ("alice", "bob")})
        print(f"[{name} {rname}] FD {out['fd'][rname]:.3f}  {out['sample_s'][rname]:.1f} s  "
              f"{out['rows_per_sample_step'][rname]:.2f} shard evals/sample/step  mallory "
              f"final mass {out['mallory_final_mass'][rname]:.3f} (prior "
              f"{priors['mallory'] / total:.3f})  alice/bob owner "
              f"{out['pair_attribution'][rname]['argmax_is_owner']:.1%}", flush=True)
    out["mallory_prior"] = priors["mallory"] / total
    out["single_contributor_share"] = {}
    for cid in store.contributor_ids:
        if owners[cid].get("corrupted"):
            continue
        images = sampler([cid], n=args.n_single, steps=args.steps, seed=args.seed).images
        share = float(np.isin(evaluator.classify(images), owners[cid]["classes"]).mean())
        out["single_contributor_share"][cid] = share
    print(f"[{name}] single-contributor share in own digits: "
          f"{ {c: round(v, 3) for c, v in out['single_contributor_share'].items()} }")
    return out


def forget_and_add(store: ShardStore, folder: Path) -> dict:
    start = time.perf_counter()
    store.exclude("mallory")
    exclusion = time.perf_counter() - start
    start = time.perf_counter()
    store.purge("mallory", device="cpu")
    purge = time.perf_counter() - start
    data = load_contributor(folder, "mallory2")
    start = time.perf_counter()
    store.add(data, device="cpu", progress=False)
    return {"exclusion_ms": 1000 * exclusion, "purge_s": purge,
            "add_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/demo-data")
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-single", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    owners = json.loads((Path(args.data) / "owners.json").read_text())["contributors"]
    evaluator = DigitsEvaluator(Path(args.data) / "heldout", seed=args.seed)
    heads = ShardStore.open(args.store)
    if heads.config.router != "heads" or not heads.config.keeps_data:
        raise SystemExit(f"{args.store} must be a heads store that keeps data: remove it "
                         "(rm -rf var/store) and run make store")
    work = Path(tempfile.mkdtemp(prefix="cdm-routing-"))
    try:
        joint, classifier_s = joint_copy(heads, work / "joint")
        report = {"settings": vars(args), "default_routing": str(DEFAULT_ROUTING),
                  "joint_classifier_train_s": classifier_s}
        for name, store in (("heads", heads), ("joint", joint)):
            report[name] = measure(store, evaluator, owners, args, results, name)
        shutil.copytree(heads.root, work / "heads", ignore=shutil.ignore_patterns("valuation",
                                                                                  "service.db*"))
        folder = Path(args.data) / "contributors" / "mallory"
        for name, root in (("heads", work / "heads"), ("joint", joint.root)):
            report[name]["forget_add"] = forget_and_add(ShardStore.open(root), folder)
            print(f"[{name}] {report[name]['forget_add']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (results / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {results / 'quality.json'}")


if __name__ == "__main__":
    main()
