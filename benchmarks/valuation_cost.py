"""Cost of exact valuation at a realistic scale (issue 10, section 6): exact Shapley by
composition against the retrain ground truth trained like the core evidence's
monolith (5,600 steps: the shards' 800 steps times 7), and against Lin et al.'s pruned
fine-tune, on the default store.

Nothing here is trained to the end. Measured, with one torch thread (what each of 2
workers gets on 2 cores), for one seeded random coalition of every size k = 1..N:

* retrain: seconds per training step of the store's UNet on D_S, over `--train-steps`
  steps with the core monolith's settings (the store's shard_train: batch 64, EMA), and
  seconds to sample and measure the model (n = 256, 25 DDPM steps, precision);
* pruned: the same for the pruned UNet (ratio 0.3), per step and per sampling;
* composition: seconds to sample the composition restricted to S and measure it (no
  cache: the samples are drawn again, and not stored).

A training step costs the same whatever the data size (a batch of 64 drawn from D_S),
which the per-size numbers check, and a run of T steps costs T times a step, which
`--linearity` checks on one coalition (T and 4T steps). Extrapolated to all 2^N
coalitions as sum_k C(N, k) * cost(k) (the empty coalition costs nothing):

    retrain(5,600)  = sum_k C(N, k) (5,600 s_step(k) + s_sample_mono)
    pruned(Lin)     = base (5,600 monolith steps + pruning + 800 pruned steps)
                      + sum_k C(N, k) (subset_steps s_step_pruned(k) + s_sample_pruned)
    composition     = sum_k C(N, k) s_compose(k)

all in core-seconds (one thread); with W workers on W cores divide by W. Prints the
measured numbers and writes RESULTS/cost.json and cost.md; it does not pass or fail.

    python benchmarks/valuation_cost.py            # ~6 min on one core
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shards import ShardStore  # noqa: E402
from shards.models import make_unet  # noqa: E402
from shards.training import TrainConfig, train_denoiser  # noqa: E402
from valuation.monolith import prune_unet, single_model_sampler  # noqa: E402
from valuation.properties import load_property  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "valuation-cost"
CORE_MONOLITH_STEPS = 5600
FINETUNE_STEPS = 800  # the pruned model's fine-tune on D_N (valuation's default)
# measured on the default store (docs/evidence.md, "Valuation on the default store"), 2 workers
MEASURED = {"exact_composition_wall_s": 327.0, "retrain_800_wall_s": 2942.0,
            "pruned_1000_wall_s": 2660.0, "pruned_100_wall_s": 397.0, "workers": 2}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def train_seconds(model, images, schedule, base: TrainConfig, steps: int) -> float:
    config = base.with_steps(steps)
    return timed(lambda: train_denoiser(model, images, schedule, config, seed=0,
                                        progress=False))[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="var/store")
    parser.add_argument("--property", default="precision")
    parser.add_argument("--train-steps", type=int, default=200, help="timed steps per coalition")
    parser.add_argument("--linearity", type=int, default=150,
                        help="T: one coalition trained T and 4T steps (0: skip)")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--subset-steps", default="100,1000",
                        help="pruned fine-tune steps per coalition to extrapolate")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--from", dest="source", default=None,
                        help="re-derive the report from an earlier cost.json (no timing)")
    parser.add_argument("--load", default=None, help="load average to note in the report")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = ShardStore.open(args.store)
    players = list(store.contributor_ids)
    n_players = len(players)
    schedule = store.noise_schedule()
    base = store.config.shard_train
    measure = load_property(store.root, args.property)
    sampler = store.load_sampler("cpu")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()

    def sample_and_measure(model) -> float:
        s = single_model_sampler(model.eval(), dict(schedule.config), store.image_shape)
        return timed(lambda: measure(s(["all"], n=args.n, steps=args.steps, seed=0).images))[1]

    def measure_all():
        rows = []
        for k in range(1, n_players + 1):
            coalition = sorted(rng.choice(players, k, replace=False).tolist())
            images = torch.cat([store.contributor_images(c) for c in coalition])
            mono = make_unet(store.image_shape, store.config.unet, seed=0)
            t_train = train_seconds(mono, images, schedule, base, args.train_steps)
            t_sample = sample_and_measure(mono)
            pruned = make_unet(store.image_shape, store.config.unet, seed=0)
            info = prune_unet(pruned, args.ratio)
            t_ptrain = train_seconds(pruned, images, schedule, base, args.train_steps)
            t_psample = sample_and_measure(pruned)
            _, t_comp = timed(lambda c=coalition: measure(sampler(
                c, n=args.n, steps=args.steps, seed=0, scheduler="ddpm").images))
            rows.append({"k": k, "coalition": coalition, "images": len(images),
                         "retrain_step_s": t_train / args.train_steps, "retrain_sample_s": t_sample,
                         "pruned_step_s": t_ptrain / args.train_steps, "pruned_sample_s": t_psample,
                         "compose_s": t_comp, "pruned_params": info})
            print(f"k={k} {coalition}: retrain {1000 * t_train / args.train_steps:.1f} ms/step, "
                  f"sample {t_sample:.2f} s; pruned {1000 * t_ptrain / args.train_steps:.1f} ms/step, "
                  f"sample {t_psample:.2f} s; composition {t_comp:.2f} s", flush=True)
        linearity = None
        if args.linearity:
            images = torch.cat([store.contributor_images(c) for c in players])
            short = train_seconds(make_unet(store.image_shape, store.config.unet, seed=0), images,
                                  schedule, base, args.linearity)
            long = train_seconds(make_unet(store.image_shape, store.config.unet, seed=0), images,
                                 schedule, base, 4 * args.linearity)
            linearity = {"steps": [args.linearity, 4 * args.linearity], "seconds": [short, long],
                         "ratio": long / short}
            print(f"linearity: {args.linearity} steps {short:.1f} s, {4 * args.linearity} steps "
                  f"{long:.1f} s (x{long / short:.2f}, 4 expected)", flush=True)
        return rows, linearity


    load = args.load or "{:.1f}, {:.1f}, {:.1f} (1, 5, 15 min)".format(*os.getloadavg())
    if args.source:
        before = json.loads(Path(args.source).read_text())
        load = args.load or before.get("load_average", "not recorded")
        rows, linearity, seconds = before["per_size"], before["linearity"], before["seconds"]
        command = before["command"]
    else:
        rows, linearity = measure_all()
        seconds = time.perf_counter() - t0
        command = "python benchmarks/valuation_cost.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
    count = {r["k"]: math.comb(n_players, r["k"]) for r in rows}
    step_mean = float(np.mean([r["retrain_step_s"] for r in rows]))
    pstep_mean = float(np.mean([r["pruned_step_s"] for r in rows]))

    def total(per) -> float:
        return float(sum(count[r["k"]] * per(r) for r in rows))

    retrain = {steps: total(lambda r, s=steps: s * r["retrain_step_s"] + r["retrain_sample_s"])
               for steps in (800, CORE_MONOLITH_STEPS)}
    pruned_base = CORE_MONOLITH_STEPS * step_mean + FINETUNE_STEPS * pstep_mean
    pruned = {int(s): pruned_base + total(lambda r, s=int(s): s * r["pruned_step_s"]
                                          + r["pruned_sample_s"])
              for s in args.subset_steps.split(",")}
    composition = total(lambda r: r["compose_s"])
    w = MEASURED["workers"]
    # the load-free anchor: the full 800-step retrain run measured on this store, against
    # its extrapolation from the timings here; training-type work is deflated by it
    deflate = w * MEASURED["retrain_800_wall_s"] / retrain[800]
    anchored = {"deflation": deflate,
                "composition": MEASURED["exact_composition_wall_s"],
                "retrain_800": MEASURED["retrain_800_wall_s"],
                "retrain_5600": retrain[CORE_MONOLITH_STEPS] * deflate / w,
                # the base is one sequential training (one thread), not spread over workers
                "pruned_base_5600": pruned_base * deflate,
                "pruned_1000": pruned_base * deflate + MEASURED["pruned_1000_wall_s"],
                "pruned_100": pruned_base * deflate + MEASURED["pruned_100_wall_s"]}
    result = {
        "command": command,
        "store": str(store.root), "players": players, "property": args.property,
        "settings": {"n": args.n, "steps": args.steps, "train_steps_timed": args.train_steps,
                     "train": base.to_dict(), "pruning_ratio": args.ratio, "threads": 1},
        "per_size": rows, "linearity": linearity,
        "retrain_step_s_mean": step_mean, "pruned_step_s_mean": pstep_mean,
        "extrapolated_core_s": {
            "composition": composition, "retrain_800": retrain[800],
            "retrain_5600": retrain[CORE_MONOLITH_STEPS], "pruned_base_5600": pruned_base,
            **{f"pruned_{s}": v for s, v in pruned.items()}},
        "ratios": {
            "retrain_5600_over_composition": retrain[CORE_MONOLITH_STEPS] / composition,
            "retrain_800_over_composition": retrain[800] / composition,
            "retrain_800_extrapolated_over_measured":
                retrain[800] / (w * MEASURED["retrain_800_wall_s"]),
            "retrain_5600_over_measured_composition":
                retrain[CORE_MONOLITH_STEPS] / (w * MEASURED["exact_composition_wall_s"]),
            **{f"pruned_{s}_over_composition": v / composition for s, v in pruned.items()}},
        "measured_before": MEASURED, "seconds": seconds, "anchored_wall_s": anchored,
        "load_average": load}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(result, indent=1) + "\n")
    e, r = result["extrapolated_core_s"], result["ratios"]
    lines = [f"# Cost of exact valuation at scale, N = {n_players}\n", f"`{result['command']}`\n",
             f"One torch thread; {args.train_steps} timed training steps per coalition size "
             f"(batch {base.batch_size}); sampling n = {args.n}, {args.steps} DDPM steps, "
             f"{args.property}. {result['seconds']:.0f} s in all.\n",
             f"Load average when measured: {load}.\n",
             "| k | coalition | images | retrain ms/step | monolith sample s | pruned ms/step | "
             "pruned sample s | composition s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['k']} | {','.join(row['coalition'])} | {row['images']} | "
                     f"{1000 * row['retrain_step_s']:.1f} | {row['retrain_sample_s']:.2f} | "
                     f"{1000 * row['pruned_step_s']:.1f} | {row['pruned_sample_s']:.2f} | "
                     f"{row['compose_s']:.2f} |")
    if linearity:
        lines.append(f"\nLinearity: {linearity['steps'][0]} steps {linearity['seconds'][0]:.1f} s, "
                     f"{linearity['steps'][1]} steps {linearity['seconds'][1]:.1f} s "
                     f"(x{linearity['ratio']:.2f}; 4 if linear).")
    lines += ["", f"Extrapolated to all {2 ** n_players} coalitions, core-seconds (one thread):",
              "", "| utility | core-s | hours | / composition |", "|---|---|---|---|"]
    for name, label in (("composition", "exact by composition"),
                        ("retrain_800", "retrain, 800 steps (the measured small truth)"),
                        ("retrain_5600", "retrain, 5,600 steps (core monolith)"),
                        *((f"pruned_{s}", f"pruned fine-tune, {s} steps per coalition "
                           "(base: 5,600 + 800 steps)") for s in pruned)):
        lines.append(f"| {label} | {e[name]:.0f} | {e[name] / 3600:.2f} | "
                     f"{e[name] / composition:.1f} |")
    lines.append(f"\nCheck of the extrapolation: the 800-step retrain of all coalitions, "
                 f"measured on this store, took {MEASURED['retrain_800_wall_s']:.0f} s wall with "
                 f"2 workers ({w * MEASURED['retrain_800_wall_s']:.0f} core-s); extrapolated "
                 f"here {e['retrain_800']:.0f} core-s "
                 f"(x{r['retrain_800_extrapolated_over_measured']:.2f}: the load these timings "
                 "were taken under).")
    a = anchored
    lines += ["", "Anchored on the full runs measured on this store (wall-clock seconds with 2 "
              "workers): composition, retrain (800 steps) and pruned fine-tune per coalition "
              "as measured; retrain at 5,600 steps and the 5,600-step pruned base (one "
              "sequential training, 5,600 + 800 steps, added once) from the "
              f"timings here, deflated by x{1 / a['deflation']:.2f} (the 800-step retrain's "
              "extrapolation over its measurement):", "",
              "| utility (all coalitions) | wall s, 2 workers | hours | / composition |",
              "|---|---|---|---|"]
    for name, label in (("composition", "exact by composition (measured)"),
                        ("retrain_800", "retrain, 800 steps (measured)"),
                        ("retrain_5600", "retrain, 5,600 steps"),
                        ("pruned_100", "pruned fine-tune, 5,600-step base + 100 steps per coalition"),
                        ("pruned_1000", "pruned fine-tune, 5,600-step base + 1,000 steps per "
                                        "coalition")):
        lines.append(f"| {label} | {a[name]:.0f} | {a[name] / 3600:.2f} | "
                     f"{a[name] / a['composition']:.1f} |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    print((out / "cost.md").read_text())


if __name__ == "__main__":
    main()
