"""Training steps a second of one shard's UNet, and of one density-ratio head, under
the settings `cdm train` offers: one process with all threads, or P processes with
one thread each (`--workers`), in float32 or under bfloat16 autocast (`--precision`).
Random images of the store's shape and labels, batch 64 (heads: 128 + 128), EMA on as
for shards. Prints measured numbers (aggregate steps a second over the processes); it
does not pass or fail.

    .venv/bin/python benchmarks/train_throughput.py --store var/studios-store
    .venv/bin/python benchmarks/train_throughput.py --store var/store
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _steps_per_second(what: str, manifest: dict, steps: int, threads: int, precision: str) -> float:
    torch.set_num_threads(threads)
    from shards.heads import DensityRatioHead, train_head
    from shards.models import make_noise_schedule, make_unet
    from shards.training import TrainConfig, train_denoiser
    from shards.trunk import fit_for, head_width

    shape = tuple(manifest["image_shape"])
    labels_n = max(1, manifest["num_labels"])
    config = manifest["config"]
    schedule = make_noise_schedule(config["schedule"])
    g = torch.Generator().manual_seed(0)
    images = torch.rand((1500, *shape), generator=g) * 2 - 1
    labels = torch.randint(0, labels_n, (1500,), generator=g)
    start = time.perf_counter()
    if what == "shard":
        model = make_unet(shape, config["unet"], seed=0, num_labels=manifest["num_labels"])
        train_denoiser(model, images, schedule, TrainConfig(steps=steps, ema=True, warmup_steps=min(5, steps),
                                                            precision=precision), 0,
                       labels=labels if manifest["num_labels"] else None, progress=False)
    else:
        # as the store's heads: reading its trunk when it has one (shards/trunk.py)
        trunk = fit_for(images, config.get("head_trunk", 0))
        head = DensityRatioHead(in_features=head_width(shape, trunk),
                                hidden=config["head_hidden"], num_labels=manifest["num_labels"])
        y = labels if manifest["num_labels"] else None
        train_head(head, images, images.flip(0), schedule,
                   TrainConfig(steps=steps, batch_size=128, warmup_steps=min(5, steps)), 0,
                   labels=y, reference_labels=y, trunk=trunk, progress=False)
    return steps / (time.perf_counter() - start)


def measure(what: str, manifest: dict, steps: int, procs: int, threads: int, precision: str) -> float:
    if procs == 1:
        return _steps_per_second(what, manifest, steps, threads, precision)
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        # warm the workers (imports) before the timed round
        list(pool.map(_steps_per_second, [what] * procs, [manifest] * procs, [2] * procs,
                      [threads] * procs, [precision] * procs))
        rates = pool.map(_steps_per_second, [what] * procs, [manifest] * procs, [steps] * procs,
                         [threads] * procs, [precision] * procs)
        return sum(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a store: its image shape, UNet, labels")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--head-steps", type=int, default=1000)
    args = parser.parse_args()
    manifest = json.loads((Path(args.store) / "manifest.json").read_text())
    if manifest.get("text"):
        parser.error(f"{args.store} is text-conditional; this benchmark times label-conditional "
                     "and unconditional models only (a store built with --no-text)")
    cores = os.cpu_count() or 1
    print(f"{args.store}: images {manifest['image_shape']}, {cores} cores")
    cases = [(1, cores, "fp32"), (1, 1, "fp32"), (cores, 1, "fp32"),
             (1, cores, "bf16"), (1, 1, "bf16"), (cores, 1, "bf16")]
    for what, steps in (("shard", args.steps), ("head", args.head_steps)):
        for procs, threads, precision in cases:
            if what == "head" and precision == "bf16":
                continue  # heads train in float32
            rate = measure(what, manifest, steps, procs, threads, precision)
            print(f"{what:5s} {procs} process(es) x {threads} thread(s) {precision}: "
                  f"{rate:7.2f} steps/s", flush=True)


if __name__ == "__main__":
    main()
