"""Scaling evidence: cost per image against the number of contributors, dense vs
routed, and the cost of forgetting and admission. Prints measured numbers and writes
benchmarks/results/scale/scale.json and cost.png; it does not pass or fail.

For each N: `cdm demo-data --contributors N` (N = 7: the default split), a store with
short training (full shards, router `heads`), then
  * build time per contributor, store size;
  * per-image sampling cost of one shard alone, of all N shards dense, routed with the
    default routing and with top-1, each also as a ratio to the one shard in the
    same run; shard evaluations per sample and step; the router's own cost;
  * resident memory of the process after sampling;
  * exclusion latency, purge time (5 contributors each), add time (one fixed new
    contributor, the same at every N);
  * at the largest N: a bounded shard cache (--cache) under a Zipf licence mix.
Also: the monolithic baseline of core_evidence.py (5,600 steps) timed on a prefix of
its steps and extrapolated linearly, the reference for purge time.

With `--data DIR` (a folder of `cdm demo-data DIR --dataset studios`), the contributors
are the studios' images split into N (each studio into parts in proportion to its
images, by concept), class-conditional on the category, on the store defaults for
their size (the 1.06M-parameter UNet at 16x16), shards from a public base; "drawn"
adds the routing that draws one shard per sample and step (draw_above 0). The shards
are trained briefly (a pass costs the same whatever the weights); the heads longer,
since how many shards the routing evaluates depends on them.

    python benchmarks/scale.py --ns 7,32,128
    python benchmarks/scale.py --data var/studios-data --ns 6,32,128 --head-steps 800 \
        --images 100 --steps 20 --results benchmarks/results/scale-studios
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from shards import ShardStore, StoreConfig, load_contributors  # noqa: E402
from shards.config import defaults_for  # noqa: E402
from shards.data import ContributorData, load_contributor, load_image_folder  # noqa: E402
from shards.demo import write_demo_data  # noqa: E402
from shards.files import tensor_hash  # noqa: E402
from shards.models import make_unet  # noqa: E402
from shards.routing import DEFAULT_ROUTING, Routing  # noqa: E402
from shards.sampler import SampleRequest  # noqa: E402
from shards.training import TrainConfig, train_denoiser  # noqa: E402
from valuation.monolith import single_model_sampler  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "scale"
TOP1 = Routing("topk", top_k=1)
DRAWN = replace(DEFAULT_ROUTING, draw_above=0)  # one shard drawn from w at every step


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sampling_costs(store: ShardStore, n: int, steps: int, device: str) -> dict:
    """Seconds per image: one shard alone, and all shards dense / routed."""
    sampler = store.load_sampler(device)
    first = store.contributor_ids[0]
    if store.num_labels:  # one shard: the composition restricted to it (it draws the labels)
        def one(_, **kw):
            return sampler([first], **kw)
    else:
        one = single_model_sampler(store.load_shard(first), sampler.schedule_config,
                                   store.image_shape).to(device)
    one(None, n=n, steps=2, seed=1)  # warm-up
    sampler(None, n=n, steps=2, seed=1, routing=DEFAULT_ROUTING)  # warm-up, loads shards
    _, t_one = timed(one, None, n=n, steps=steps, seed=0)
    out = {"one_shard": t_one / n}
    cases = (("dense", Routing()), ("routed", DEFAULT_ROUTING), ("top1", TOP1), ("drawn", DRAWN))
    for name, routing in cases:
        rows = sampler.shard_rows
        _, sec = timed(sampler, None, n=n, steps=steps, seed=0, routing=routing)
        out[name] = sec / n
        out[f"{name}_ratio"] = sec / t_one
        out[f"{name}_rows_per_sample_step"] = (sampler.shard_rows - rows) / (n * steps)
    x, t = torch.randn(n, *store.image_shape, device=device), torch.full((n,), 500, device=device)
    y = torch.zeros(n, dtype=torch.long, device=device) if store.num_labels else None
    with torch.no_grad():
        sampler.router.log_ratios(x, t, y)
        _, sec = timed(lambda: [sampler.router.log_ratios(x, t, y) for _ in range(steps)])
    out["router"] = sec / n
    out["router_ratio"] = sec / t_one
    out["rss_mib"] = psutil.Process().memory_info().rss / 2**20
    return out


def forget_and_add(store: ShardStore, newcomer: ContributorData, device: str,
                   count: int = 5) -> dict:
    victims = store.contributor_ids[1:1 + count]
    excl, purge = [], []
    for cid in victims:
        excl.append(timed(store.exclude, cid)[1])
        purge.append(timed(store.purge, cid)[1])
    _, add = timed(store.add, newcomer, device=device, progress=False)
    return {"exclusion_ms": 1000 * statistics.median(excl),
            "purge_s": statistics.median(purge), "add_s": add}


def zipf_cache(store: ShardStore, capacity: int, requests: int, n: int, steps: int,
               device: str, seed: int = 0) -> dict:
    """Requests licensing 1-4 contributors drawn from a Zipf(1.1) popularity."""
    rng = np.random.default_rng(seed)
    ids = store.contributor_ids
    p = 1.0 / np.arange(1, len(ids) + 1) ** 1.1
    p /= p.sum()
    reqs = [SampleRequest(tuple(sorted(set(rng.choice(ids, size=rng.integers(1, 5), p=p)))), n, i)
            for i in range(requests)]
    out = {}
    for name, cap in (("bounded", capacity), ("unbounded", None)):
        sampler = store.load_sampler(device, cache_shards=cap)
        start = time.perf_counter()
        for r in reqs:
            sampler.sample_batch([r], steps=steps, routing=DEFAULT_ROUTING)
        out[name] = {"seconds_per_image": (time.perf_counter() - start) / (n * requests),
                     **sampler.bank.stats()}
    return out


def monolith_seconds(store_config: StoreConfig, images: torch.Tensor, schedule, device: str,
                     total_steps: int = 5600, timed_steps: int = 300) -> float:
    model = make_unet(tuple(images.shape[1:]), store_config.unet, seed=0)
    train = TrainConfig(steps=timed_steps, warmup_steps=10)
    _, sec = timed(train_denoiser, model, images, schedule, train, 0, device=device,
                   progress=False)
    return sec * total_steps / timed_steps


def split_contributors(data: Path, n: int) -> list[ContributorData]:
    """The contributors of a demo-data folder split into `n` (each into parts in
    proportion to its images, at least one; images dealt out in file order, so the
    concepts spread over the parts), labelled, without captions."""
    whole = [replace(d, captions=None) for d in load_contributors(data / "contributors")]
    sizes = np.array([len(d) for d in whole], dtype=float)
    parts = np.maximum(1, np.floor(n * sizes / sizes.sum())).astype(int)
    for i in np.argsort(-(n * sizes / sizes.sum() - parts))[:max(0, n - parts.sum())]:
        parts[i] += 1  # largest remainders first
    out = []
    for d, k in zip(whole, parts, strict=True):
        for j in range(k):
            idx = torch.arange(j, len(d), k)
            images = d.images[idx]
            out.append(ContributorData(f"{d.contributor_id}-{j:03d}" if k > 1 else d.contributor_id,
                                       images, tensor_hash(images, d.labels[idx]), d.labels[idx],
                                       d.licence))
    return out


def run_n(n_contrib: int, work: Path, args) -> dict:
    train = {"shard_train": TrainConfig(steps=args.shard_steps, warmup_steps=2),
             "head_train": TrainConfig(steps=args.head_steps, warmup_steps=2)}
    if args.data:  # the studios split into n, class-conditional, the defaults for their size
        data = Path(args.data)
        datasets = split_contributors(data, n_contrib)
        pub = load_contributor(data / "public", "public")
        public, public_labels = pub.images, pub.labels
        config = StoreConfig(**{**defaults_for(datasets[0].image_shape, public=True), **train,
                                "base_train": train["shard_train"],
                                "steps_reference_images": None})
        newcomer = replace(load_contributor(data / "heldout", "newcomer"), captions=None)
        newcomer = replace(newcomer, images=newcomer.images[:40], labels=newcomer.labels[:40])
    else:
        data = work / f"data-{n_contrib}"
        write_demo_data(data, contributors=None if n_contrib == 7 else n_contrib)
        # unconditional, as measured (the demo data is labelled; `cdm train --no-labels`)
        datasets = [replace(d, labels=None) for d in load_contributors(data / "contributors")]
        public, public_labels = load_image_folder(data / "public"), None
        config = StoreConfig(**train)
        newcomer = ContributorData("newcomer", load_image_folder(data / "heldout" / "0")[:40],
                                   "fixed")
    store, build = timed(ShardStore.create, work / f"store-{n_contrib}", datasets, config,
                         public=public, public_labels=public_labels, device=args.device,
                         progress=False, workers=args.workers)
    row = {"n": n_contrib, "build_s_per_contributor": build / n_contrib,
           "store_mib": du(store.root) / 2**20}
    row.update(sampling_costs(store, args.images, args.steps, args.device))
    if n_contrib == max(args.ns):
        row["zipf_cache"] = zipf_cache(store, args.cache, args.zipf_requests, 8, 10, args.device)
    row.update(forget_and_add(store, newcomer, args.device))
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("dense_ratio", "dense"), ("routed_ratio", f"routed ({DEFAULT_ROUTING})"),
                       ("top1_ratio", "routed (top_k=1)"), ("drawn_ratio", "routed, drawn"),
                       ("router_ratio", "router alone")):
        if all(key in r for r in rows):
            ax.plot(ns, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("contributors N (all composed)")
    ax.set_ylabel("cost per image / one shard's")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=lambda s: [int(v) for v in s.split(",")], default=[7, 32, 128])
    parser.add_argument("--shard-steps", type=int, default=20)
    parser.add_argument("--head-steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=64, help="images per sampling run")
    parser.add_argument("--steps", type=int, default=25, help="DDPM steps per sampling run")
    parser.add_argument("--cache", type=int, default=16, help="bounded cache size (shards)")
    parser.add_argument("--zipf-requests", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", help="a studios demo-data folder to split (default: digits)")
    parser.add_argument("--workers", type=int, default=1, help="processes training the shards")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cdm-scale-"))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"settings": vars(args), "device": device, "threads": torch.get_num_threads(),
              "default_routing": str(DEFAULT_ROUTING), "rows": []}
    try:
        for n in args.ns:
            print(f"N = {n}: building the store ...", flush=True)
            report["rows"].append(run_n(n, work, args))
            print(json.dumps(report["rows"][-1], indent=1), flush=True)
            (results / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.data:  # the digits' monolith; a training step costs the same on any data
            data = load_image_folder(work / f"data-{args.ns[0]}" / "public")
            store = ShardStore.open(work / f"store-{args.ns[0]}")
            mono = monolith_seconds(store.config, data, store.noise_schedule(), args.device)
            report["monolith_retrain_s_extrapolated"] = mono
            print(f"monolith (5,600 steps, extrapolated from 300): {mono:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (results / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report["rows"], results / "cost.png")
    print(f"wrote {results / 'scale.json'} and {results / 'cost.png'}")


if __name__ == "__main__":
    main()
