"""Where a shard's training step spends its time on this machine, and whether AdamW's
`foreach` path would help: trains the default class-conditional UNet (EMA on) on 200
random 8x8 images twice, with the default AdamW and with foreach=True, prints steps a
second and whether the weights come out bit for bit the same, then the torch profiler's
top operators over 30 steps. Prints measured numbers; it does not pass or fail.

    python benchmarks/train_step_profile.py            # 2 CPU cores: about 30 s
"""

from __future__ import annotations

import argparse
import time

import torch  # noqa: E402

import shards.training as training  # noqa: E402
from shards.models import DEFAULT_SCHEDULE, make_noise_schedule, make_unet  # noqa: E402
from shards.training import TrainConfig, train_denoiser  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    torch.manual_seed(0)
    images = torch.rand(200, 1, 8, 8) * 2 - 1
    labels = torch.randint(0, 10, (200,))
    scheduler = make_noise_schedule(DEFAULT_SCHEDULE)
    config = TrainConfig(steps=args.steps, ema=True, warmup_steps=args.steps // 5)

    def run(name: str) -> torch.Tensor:
        model = make_unet((1, 8, 8), None, seed=0, num_labels=10)
        start = time.perf_counter()
        train_denoiser(model, images, scheduler, config, 0, labels=labels, progress=False)
        print(f"{name}: {args.steps / (time.perf_counter() - start):.1f} steps/s", flush=True)
        return torch.cat([q.detach().flatten() for q in model.parameters()])

    adamw = torch.optim.AdamW
    default = run("AdamW (default)")
    training.torch.optim.AdamW = lambda *a, **k: adamw(*a, foreach=True, **k)
    try:
        foreach = run("AdamW (foreach=True)")
    finally:
        training.torch.optim.AdamW = adamw
    print(f"weights bit for bit equal: {torch.equal(default, foreach)}")
    with torch.autograd.profiler.profile() as prof:
        model = make_unet((1, 8, 8), None, seed=0, num_labels=10)
        train_denoiser(model, images, scheduler, TrainConfig(steps=30, ema=True, warmup_steps=5),
                       0, labels=labels, progress=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
