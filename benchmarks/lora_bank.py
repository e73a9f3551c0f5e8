"""LoRA shards merged into copies of the base vs unmerged on one shared base
(CDM_LORA_BANK; shards/adapters.py): cost per image and memory per resident shard.
Prints measured numbers and writes benchmarks/results/lora_bank/lora_bank.json; it
does not pass or fail.

Stores (short training: the timing depends on the architecture and the rows, not on
how good the weights are):
  digits     the default data (7 contributors, 8x8 gray), the digits UNet (164k)
  studios    the studios at 16x16 RGB (6 contributors), the studios UNet (1.06M)
  pipeline   the studios at 16x16 RGB on a tiny random Stable Diffusion pipeline
             (tests/tiny_pipeline.py), latents 4x8x8, prompts through its CLIP
For each store and each path, interleaved over --reps repetitions: seconds per image
of a request of --n images and --steps steps, dense (every shard on every row) and
routed (the default routing), and one bank pass of 64 rows spread over every shard.

    python benchmarks/lora_bank.py --studios var/studios-data
    python benchmarks/lora_bank.py --store var/studios-lora-store --n 200 --steps 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from shards import ShardStore, StoreConfig, TrainConfig, load_contributor, load_contributors  # noqa: E402
from shards.config import LARGE_IMAGES  # noqa: E402
from shards.demo import write_demo_data  # noqa: E402
from shards.routing import DEFAULT_ROUTING  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lora_bank"


def short(steps: int) -> StoreConfig:
    train = TrainConfig(steps=steps, batch_size=32, warmup_steps=5)
    return StoreConfig(kind="lora", shard_train=train, base_train=train, lora_train=train,
                       head_train=train, steps_reference_images=None)


def build(name: str, root: Path, args) -> ShardStore:
    cfg = short(args.train_steps)
    if name == "digits":
        write_demo_data(root / "data")
        pub = load_contributor(root / "data" / "public", "public")
        return ShardStore.create(root / "store", [d.__class__(**{**d.__dict__, "labels": None})
                                 for d in load_contributors(root / "data" / "contributors")],
                                 cfg, public=pub.images, progress=False, device="cpu")
    data = Path(args.studios)
    pub = load_contributor(data / "public", "public")
    datasets = load_contributors(data / "contributors")
    if name == "studios":
        cfg = cfg.replace(unet=LARGE_IMAGES["unet"])
        return ShardStore.create(root / "store", datasets, cfg, public=pub.images,
                                 public_captions=list(pub.captions), text=True, progress=False,
                                 device="cpu")
    from tiny_pipeline import make_tiny_pipeline

    make_tiny_pipeline(root / "pipeline")
    return ShardStore.create(root / "store", datasets, cfg, public=pub.images,
                             public_captions=list(pub.captions), text=True, progress=False,
                             device="cpu", pipeline=root / "pipeline")


def measure(store: ShardStore, args) -> dict:
    samplers = {lora: store.load_sampler("cpu") for lora in ("merged", "adapters")}
    for lora, sampler in samplers.items():  # the sampler's bank, rebuilt on each path
        sampler.bank = store.load_bank(lora=lora)
    ids = store.contributor_ids
    prompt = "red apple" if store.text else None
    rows = [ids[i % len(ids)] for i in range(64)]
    x = torch.randn(64, *store.image_shape, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    text = samplers["merged"].text_encoder.encode([prompt]).repeat(64) if prompt else None
    labels = torch.zeros(64, dtype=torch.long) if store.num_labels and not store.text else None
    times = {(lora, what): [] for lora in samplers for what in ("dense", "routed", "pass")}
    images = {}
    for rep in range(args.reps + 1):  # the first repetition warms up and is not counted
        for lora, sampler in samplers.items():
            for what, routing in (("dense", None), ("routed", DEFAULT_ROUTING)):
                start = time.perf_counter()
                out = sampler(n=args.n, steps=args.steps, seed=rep, prompt=prompt, routing=routing)
                if rep:
                    times[lora, what].append((time.perf_counter() - start) / args.n)
                images[lora, what] = out.images
            start = time.perf_counter()
            sampler.bank.evaluate(x, t, rows, labels, text=text)
            if rep:
                times[lora, "pass"].append(time.perf_counter() - start)
    slot_bytes = {}
    for lora, sampler in samplers.items():
        stacks = [b for layer in sampler.bank.layers.values() for n, b in layer.named_buffers()
                  if n.endswith("stack")]
        slot_bytes[lora] = sum(b[0].numel() * b.element_size() for b in stacks)
    out = {"contributors": len(ids), "image_shape": list(store.image_shape),
           "pixel_shape": list(store.pixel_shape), "slot_bytes": slot_bytes,
           "max_image_difference": max(float((images["merged", w] - images["adapters", w]).abs().max())
                                       for w in ("dense", "routed"))}
    for (lora, what), values in times.items():
        out[f"{lora}_{what}"] = {"mean": statistics.mean(values), "std": statistics.stdev(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="digits,studios,pipeline")
    parser.add_argument("--studios", default="var/studios-data", help="cdm demo-data --dataset studios --size 16")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--store", default=None,
                        help="measure this existing LoRA store instead of building --stores")
    parser.add_argument("--out", default=str(RESULTS / "lora_bank.json"))
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "args": vars(args)}
    for name in [args.store] if args.store else args.stores.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            store = ShardStore.open(name) if args.store else build(name, Path(tmp), args)
            results[name] = r = measure(store, args)
        print(f"{name}: {r['contributors']} LoRA shards on {'x'.join(map(str, r['image_shape']))}; "
              f"per resident shard merged {r['slot_bytes']['merged'] / 1e6:.2f} MB, adapters "
              f"{r['slot_bytes']['adapters'] / 1e6:.3f} MB; images differ by at most "
              f"{r['max_image_difference']:.1e}")
        for what, unit, scale in (("dense", "ms/image", 1e3), ("routed", "ms/image", 1e3),
                                  ("pass", "ms per 64-row pass", 1e3)):
            m, a = r[f"merged_{what}"], r[f"adapters_{what}"]
            print(f"  {what:6s} merged {m['mean'] * scale:7.2f} ± {m['std'] * scale:5.2f}  adapters "
                  f"{a['mean'] * scale:7.2f} ± {a['std'] * scale:5.2f} {unit}  "
                  f"(adapters/merged {a['mean'] / m['mean']:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
