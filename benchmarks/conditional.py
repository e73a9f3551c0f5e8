"""Quality at a matched training budget: composed shards against one monolithic model
trained on the union of the contributors' data with the same total number of steps,
class-conditional and unconditional, at several budgets. Prints measured numbers and
writes benchmarks/results/conditional/ (conditional.json, budget.png); it does not
pass or fail.

For each variant (`cond`: labels used, `uncond`: the same data without labels,
`lora`: class-conditional LoRA shards on a public base) and each budget multiplier m
(default 1, 2, 4 times the default steps per shard: 800 full, 400 LoRA):
  * composed: one full shard per contributor of the default data (7, mallory
    included), 7 x 800 m steps in all with EMA, split in proportion to each one's
    images (`--allocation data`, the store's default; `equal`: 800 m each), and the
    default router (one density-ratio head per contributor, 4,000 steps, trained once
    per variant: it does not depend on the shards);
  * monolith: the same UNet (class-conditional for `cond`) trained on the union for
    7 x 800 m steps (the shards' total), with the same optimiser, schedule and EMA;
    for `lora`: the class-conditional base trained on the public split (1,200 steps,
    nobody's data; once, before the other jobs), each contributor's LoRA adapter on
    it (rank 8, 7 x 400 m steps in all, EMA; merged into the base for sampling),
    against the same base fully fine-tuned on the union for 7 x 400 m steps with the
    full shards' optimiser settings, so both start from the same place;
  * FD to the held-out digits of --n samples (DDPM, --steps steps), composed with the
    default routing and monolith; for labelled variants also per-label FD
    (--per-label samples of each label against the held-out digits of that label)
    and on-label accuracy (the judge's predicted digit equals the requested label):
    composed over all contributors, over all but mallory (the planted corrupted
    one), the monolith, and each single contributor for each label it holds. Two
    judges: the FD's MLP and an SVM on the held-out and public digits (the stronger;
    see evaluator.LabelJudge); each judge's score on the honest contributors' own
    images (and on everyone's, mallory's included) is reported too, as the ceiling of
    a model that reproduced them;
  * with --fd-seeds K (default 3), the diagnosis: FD over K sampling seeds of the
    composition, the monolith and the shards' mixture (each sample from one shard
    alone, chosen by its share of the images: what the composition targets, so the
    routing's own cost is composed minus mixture), and each model's denoising loss on
    its training images and on held-out digits (the same (t, eps) draws for every
    model; each shard on the digits of its labels, against the monolith on those).
    --fd-only measures only FD over seeds, composed and monolith.

Training writes each model's weights (and a small JSON beside them) to a work folder;
--reuse DIR trains only what DIR does not hold yet, so more seeds or a later
evaluation of the same models need no retraining.

Training runs as independent jobs (one per head, shard and monolith) in --jobs worker
processes, so on a GPU several small models train at once.

    python benchmarks/conditional.py --device cuda --jobs 12      # H100: minutes
    python benchmarks/conditional.py --budgets 1,2 --variants cond --jobs 2  # CPU: 36 min
    python benchmarks/conditional.py --budgets 1 --variants lora --n 500 --per-label 50 \
        --per-single 20                                          # CPU: about 25 min
    python benchmarks/conditional.py --plot RUN/conditional.json ... --results DIR
        # only the figures: FD over the budget (budget.png), and denoising loss over the
        # budget (denoising.png) for runs that carry the diagnosis
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from evaluator import DigitsEvaluator, LabelJudge  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from shards import load_contributors  # noqa: E402
from shards.bank import ShardBank  # noqa: E402
from shards.config import StoreConfig  # noqa: E402
from shards.data import ContributorData, load_labelled_folder  # noqa: E402
from shards.heads import DensityRatioHead, StackedHeads, feature_dim, train_head  # noqa: E402
from shards.models import make_noise_schedule, make_unet  # noqa: E402
from shards.sampler import SampleRequest, compose  # noqa: E402
from shards.shard import derived_seed, train_base, train_shard  # noqa: E402
from shards.training import forward_noise, train_denoiser  # noqa: E402
from valuation.features import frechet_distance, gaussian_stats  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "conditional"
# each shard's steps come from --allocation here (the jobs set them), not from the store
# default's in-proportion rule, which `data` reproduces
CONFIG = StoreConfig(steps_reference_images=None)


# ------------------------------------------------------------------ training jobs
def _identity(spec: dict) -> dict:
    """The fields that name a training job (and its result), as strings."""
    return {k: str(spec[k]) for k in ("kind", "cid", "variant", "steps")}


def _key(job: dict) -> tuple:
    """A job's (or its result's) key in the table of trained models."""
    return job["variant"], job["kind"], job["cid"], int(job["steps"])


def _job(spec: dict) -> dict:
    """One training job in a worker: writes the state dict to spec['out']."""
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    data = load_contributors(spec["data"] / "contributors")
    if spec["variant"] == "uncond":
        data = [replace(d, labels=None) for d in data]
    num_labels = 0 if spec["variant"] == "uncond" else 10
    base = None
    if spec["variant"] == "lora" and spec["kind"] != "head":
        base = make_unet(data[0].image_shape, CONFIG.unet, num_labels=num_labels)
        base.load_state_dict(load_file(spec["base"]))
    scheduler = make_noise_schedule(CONFIG.schedule)
    start = time.perf_counter()
    if spec["kind"] == "head":
        d = next(x for x in data if x.contributor_id == spec["cid"])
        public, public_labels = load_labelled_folder(spec["data"] / "public")
        seed = derived_seed(CONFIG.seed, "head", d.contributor_id)
        torch.manual_seed(seed)
        model = DensityRatioHead(contributor_id=d.contributor_id, in_features=feature_dim(d.image_shape),
                                 hidden=CONFIG.head_hidden, num_labels=num_labels)
        train = CONFIG.head_train.with_steps(spec["steps"])  # CONFIG is not --scale'd in workers
        loss = train_head(model, d.images, public, scheduler, train, seed, labels=d.labels,
                          reference_labels=public_labels if num_labels else None, device=device,
                          progress=False)
    elif spec["kind"] == "shard":
        d = next(x for x in data if x.contributor_id == spec["cid"])
        cfg = replace(CONFIG, shard_train=CONFIG.shard_train.with_steps(spec["steps"]),
                      lora_train=CONFIG.lora_train.with_steps(spec["steps"]))
        kind = "lora" if base is not None else "full"
        model, meta = train_shard(d, kind, cfg, scheduler, base=base, device=device,
                                  progress=False, num_labels=num_labels)
        if kind == "lora":
            model = model.merge_and_unload()  # plain UNet weights for the shard bank
        loss = meta["final_loss"]
    else:  # monolith on the union
        union = ContributorData("union", torch.cat([d.images for d in data]), "-",
                                None if num_labels == 0 else torch.cat([d.labels for d in data]))
        model = base if base is not None else make_unet(union.image_shape, CONFIG.unet,
                                                        seed=CONFIG.seed, num_labels=num_labels)
        train = CONFIG.shard_train.with_steps(spec["steps"])
        loss = train_denoiser(model, union.images, scheduler, train, CONFIG.seed, labels=union.labels,
                              device=device, progress=False)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, spec["out"])
    result = {**_identity(spec), "out": spec["out"], "loss": float(loss),
              "seconds": time.perf_counter() - start}
    Path(spec["out"] + ".json").write_text(json.dumps(result))  # for --reuse
    return result


def _reused(spec: dict) -> dict | None:
    """A job's result from an earlier run in the same --reuse folder, or None."""
    out = Path(spec["out"])
    if not out.exists():
        return None
    side = Path(spec["out"] + ".json")
    if side.exists():
        # the weights' path here (the JSON may name where they were trained)
        return {**json.loads(side.read_text()), "out": spec["out"], "reused": True}
    return {**_identity(spec), "out": spec["out"], "loss": None, "seconds": None, "reused": True}


def _train_base(data_dir: Path, work: Path, args) -> tuple[str, dict]:
    """The LoRA variant's class-conditional public base (nobody's data), trained once."""
    public, public_labels = load_labelled_folder(data_dir / "public")
    config = replace(CONFIG, base_train=CONFIG.base_train.with_steps(
        max(2, int(CONFIG.base_train.steps * args.scale))))
    start = time.perf_counter()
    model, loss = train_base(public, tuple(public.shape[1:]), config,
                             make_noise_schedule(CONFIG.schedule), args.device, progress=False,
                             labels=public_labels, num_labels=10)
    out = str(work / "lora-base.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out)
    info = {"steps": config.base_train.steps, "images": len(public), "loss": float(loss),
            "seconds": time.perf_counter() - start}
    print(f"trained the public base ({info['steps']} steps, {info['seconds']:.0f} s)", flush=True)
    return out, info


# ------------------------------------------------------------------ samplers
def _sampler(shards: dict[str, dict], heads: dict[str, dict], data, num_labels, device):
    ids = sorted(shards)
    template = make_unet(data[0].image_shape, CONFIG.unet, num_labels=num_labels)
    bank = ShardBank(template, lambda c: shards[c], ids)
    router = None  # one model alone: weight 1
    if len(ids) > 1:
        modules = []
        for c in ids:
            h = DensityRatioHead(contributor_id=c, in_features=feature_dim(data[0].image_shape),
                                 hidden=CONFIG.head_hidden, num_labels=num_labels)
            h.load_state_dict(heads[c])
            modules.append(h.eval())
        router = StackedHeads(modules)
    sizes = {d.contributor_id: float(len(d)) for d in data}
    counts = {d.contributor_id: d.label_counts() for d in data} if num_labels else None
    schedule = dict(make_noise_schedule(CONFIG.schedule).config)
    return compose(bank, schedule, data[0].image_shape, router, {c: sizes.get(c, 1.0) for c in ids},
                   counts, num_labels).to(device)


def _sample(sampler, contributors, n, seed, steps, labels=None, chunk=500):
    outs = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        lab = None if labels is None else tuple(labels[start:start + m])
        req = SampleRequest(None if contributors is None else tuple(contributors), m, seed + start, lab)
        outs.append(sampler.sample_batch([req], steps=steps)[0])
    images = torch.cat([o.images for o in outs])
    return images, (None if outs[0].labels is None else torch.cat([o.labels for o in outs]))


def _mixture_sample(sampler, data, n, seed, steps):
    """n samples of the mixture of the shards' own distributions, sum_i (N_i / N) p_i:
    each sample comes from one shard alone, chosen with probability its share of the
    images (and its label from that shard's own label counts). This is what the
    composition targets (p_S = sum_i lambda_i p_i); its FD against the composition's
    says how much of the gap to the monolith the routing adds, and the rest is the
    shards themselves."""
    ids = [d.contributor_id for d in data]
    share = np.array([len(d) for d in data], dtype=float)
    counts = np.random.default_rng(seed).multinomial(n, share / share.sum())
    return torch.cat([_sample(sampler, [c], int(k), seed + 13 * i, steps)[0]
                      for i, (c, k) in enumerate(zip(ids, counts, strict=True)) if k > 0])


def _fd_seeds(sampler, mono, evaluator, data, args, mixture: bool = True) -> dict:
    """FD of the composition, the monolith and (with `mixture`) the shards' mixture
    over --fd-seeds sampling seeds (the same models): how much of a gap is sampling
    noise."""
    rows = {"composed": [], "monolith": []} | ({"mixture": []} if mixture else {})
    for k in range(args.fd_seeds):
        seed = args.seed + 1000 * k
        rows["composed"].append(evaluator.fd(_sample(sampler, None, args.n, seed, args.steps)[0]))
        rows["monolith"].append(evaluator.fd(_sample(mono, None, args.n, seed, args.steps)[0]))
        if mixture:
            rows["mixture"].append(evaluator.fd(_mixture_sample(sampler, data, args.n, seed,
                                                                args.steps)))
    gaps = [c / m - 1 for c, m in zip(rows["composed"], rows["monolith"], strict=True)]
    return {**rows, "gap": gaps,
            "mean": {k: float(np.mean(v)) for k, v in {**rows, "gap": gaps}.items()},
            "sd": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                   for k, v in {**rows, "gap": gaps}.items()}}


def _denoising_loss(model, scheduler, images: torch.Tensor, labels, num_labels: int, device,
                    seed: int, draws: int = 8) -> float:
    """Mean denoising loss ||eps - eps_theta(x_t, t, y)||^2 of a UNet (on `device`, in
    eval mode) on `images`, over `draws` draws of (t, eps) per image from a generator
    seeded with `seed`: the same draws for every model given the same images, so two
    models' losses on one set are a paired comparison."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(draws):
            x_t, t, eps = forward_noise(scheduler, images, generator)
            for i in range(0, len(images), 512):
                y = None if not num_labels else labels[i:i + 512].to(device)
                out = model(x_t[i:i + 512].to(device), t[i:i + 512].to(device), class_labels=y).sample
                total += float(((out.cpu() - eps[i:i + 512]) ** 2).mean(dim=(1, 2, 3)).sum())
    return total / (draws * len(images))


def _generalisation(shards: dict, mono_state: dict, data, heldout, num_labels, device, seed) -> dict:
    """Denoising loss of each shard on its own training images and on the held-out
    digits of the labels it holds, against the monolith's on the same two sets (the
    same (t, eps) draws): where a shard's held-out loss exceeds the monolith's, the
    shard generalises worse from its fewer images, whatever its training loss.
    `data` must carry labels (they pick each shard's held-out digits)."""
    x_held, y_held = heldout
    scheduler = make_noise_schedule(CONFIG.schedule)

    def unet(state: dict):
        model = make_unet(tuple(x_held.shape[1:]), CONFIG.unet, num_labels=num_labels)
        model.load_state_dict(state)
        return model.to(device).eval()

    def loss(model, images, labels) -> float:
        return _denoising_loss(model, scheduler, images, labels, num_labels, device, seed)

    mono = unet(mono_state)
    out = {"monolith": {"train": loss(mono, torch.cat([d.images for d in data]),
                                      torch.cat([d.labels for d in data])),
                        "heldout": loss(mono, x_held, y_held)},
           "shards": {}}
    for d in data:
        keep = torch.isin(y_held, torch.tensor(sorted(d.label_counts())))
        xs, ys = x_held[keep], y_held[keep]
        shard = unet(shards[d.contributor_id])
        out["shards"][d.contributor_id] = {
            "train": loss(shard, d.images, d.labels), "heldout": loss(shard, xs, ys),
            "monolith_train": loss(mono, d.images, d.labels),
            "monolith_heldout": loss(mono, xs, ys)}
    return out

def _evaluate(sampler, mono, evaluator, judge, heldout, data, args, variant) -> dict:
    fd = evaluator.fd
    out: dict = {}
    images, _ = _sample(sampler, None, args.n, args.seed, args.steps)
    mono_images, _ = _sample(mono, None, args.n, args.seed, args.steps)
    out["fd"] = {"composed": fd(images), "monolith": fd(mono_images)}
    out["fd"]["gap"] = out["fd"]["composed"] / out["fd"]["monolith"] - 1
    out["sample_rows_per_step"] = sampler.shard_rows / (args.n * args.steps)
    if variant == "uncond":
        return out
    x_held, y_held = heldout
    per_label, on_label, on_label_svm = {}, {}, {}
    honest = [d.contributor_id for d in data if d.contributor_id != "mallory"]  # the planted one
    for model_name, model, subset in (("composed", sampler, None), ("monolith", mono, None),
                                      ("composed_honest", sampler, honest)):
        labels = [y for y in range(10) for _ in range(args.per_label)]
        imgs, got = _sample(model, subset, len(labels), args.seed + 7, args.steps, labels)
        pred, pred_svm = evaluator.classify(imgs), judge.classify(imgs)
        feats = evaluator.net.features(imgs).detach().numpy()
        with torch.no_grad():
            ref = evaluator.net.features(torch.as_tensor(x_held)).numpy()
        per_label[model_name] = {y: frechet_distance(*gaussian_stats(feats[got.numpy() == y]),
                                                     *gaussian_stats(ref[y_held == y]))
                                 for y in range(10)}
        on_label[model_name] = {y: float((pred[got.numpy() == y] == y).mean()) for y in range(10)}
        on_label_svm[model_name] = {y: float((pred_svm[got.numpy() == y] == y).mean())
                                    for y in range(10)}
    single, single_svm = {}, {}
    for d in data:
        for y in d.label_counts():
            imgs, _ = _sample(sampler, [d.contributor_id], args.per_single, args.seed + 11,
                              args.steps, [y] * args.per_single)
            single.setdefault(d.contributor_id, {})[y] = float(
                (evaluator.classify(imgs) == y).mean())
            single_svm.setdefault(d.contributor_id, {})[y] = float((judge.classify(imgs) == y).mean())
    out.update(per_label_fd=per_label, on_label=on_label, on_label_single=single,
               on_label_svm=on_label_svm, on_label_single_svm=single_svm)
    return out


def _real_on_label(judges: dict, data, honest_only: bool = True) -> dict:
    """Per judge and label, the share of the honest contributors' own images (or, with
    honest_only False, every contributor's, mallory's corrupted ones included) it
    assigns to their label: the most a model that reproduced that data exactly would
    score."""
    chosen = [d for d in data if (d.contributor_id != "mallory" or not honest_only)
              and d.labels is not None]
    images = (torch.cat([d.images for d in chosen]) + 1) / 2  # stored in [-1, 1]
    labels = torch.cat([d.labels for d in chosen]).numpy()
    return {name: {int(y): float((j.classify(images)[labels == y] == y).mean())
                   for y in np.unique(labels)} for name, j in judges.items()}


def _fd_seeds_line(f: dict) -> str:
    """FD mean +- sd over seeds of each model measured, and the gap's."""
    names = {"composed": "composed", "monolith": "monolith", "mixture": "shards' mixture"}
    fds = ", ".join(f"{names[k]} {f['mean'][k]:.3f} +- {f['sd'][k]:.3f}" for k in names if k in f)
    return (f"over {len(f['composed'])} seeds: FD {fds}; gap {f['mean']['gap']:+.1%} +- "
            f"{f['sd']['gap']:.1%}")


def _diagnosis_line(result: dict) -> str:
    """Two lines: FD over seeds, and the honest shards' denoising loss against the
    monolith's on the same images."""
    dn = result["denoising"]
    honest = {c: v for c, v in dn["shards"].items() if c != "mallory"}
    excess = np.mean([v["heldout"] / v["monolith_heldout"] - 1 for v in honest.values()])
    train_excess = np.mean([v["train"] / v["monolith_train"] - 1 for v in honest.values()])
    return (f"  {_fd_seeds_line(result['fd_seeds'])}\n"
            f"  denoising loss, honest shards against the monolith on the same images: "
            f"training {train_excess:+.1%}, held-out {excess:+.1%} (monolith: training "
            f"{dn['monolith']['train']:.4f}, held-out {dn['monolith']['heldout']:.4f})")


# ------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="var/demo-data", help="cdm demo-data output (labelled)")
    p.add_argument("--budgets", default="1,2,4",
                   help="multiples of the default steps per shard (800 full, 400 LoRA)")
    p.add_argument("--variants", default="cond,uncond")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="training worker processes")
    p.add_argument("--n", type=int, default=1000, help="samples for the overall FD")
    p.add_argument("--per-label", type=int, default=200, help="samples per label")
    p.add_argument("--per-single", type=int, default=100,
                   help="samples per (single contributor, label it holds)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDPM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every training length (a quick check: 0.01)")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds: stop waiting for training after this (0: no limit)")
    p.add_argument("--allocation", choices=("equal", "data"), default="data",
                   help="split the shards' total steps in proportion to each contributor's "
                        "images (the store's default: each image then gets as many steps as "
                        "in the monolith, in expectation) or equally (stores of before)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--fd-seeds", type=int, default=3,
                   help="also measure FD (composed, monolith, the shards' mixture) over this "
                        "many sampling seeds, with the shards' and monolith's denoising loss "
                        "on training and held-out digits (0: neither)")
    p.add_argument("--fd-only", action="store_true",
                   help="measure only FD over --fd-seeds seeds, composed and monolith (with "
                        "--reuse: more seeds for trained models, quickly)")
    p.add_argument("--reuse", metavar="DIR",
                   help="a folder of trained weights (an earlier run's work folder, or empty "
                        "to keep this run's): jobs whose weights are there are not retrained")
    p.add_argument("--plot", nargs="+", metavar="JSON",
                   help="only draw the curves of earlier runs' conditional.json files (each "
                        "labelled by its split and device) into --results/budget.png")
    args = p.parse_args()
    if args.plot:
        reports = [json.loads(Path(f).read_text()) for f in args.plot]
        Path(args.results).mkdir(parents=True, exist_ok=True)
        _plot(reports, Path(args.results) / "budget.png")
        print(f"wrote {args.results}/budget.png")
        if _plot_denoising(reports, Path(args.results) / "denoising.png"):
            print(f"wrote {args.results}/denoising.png")
        return
    data_dir = Path(args.data)
    if not (data_dir / "owners.json").exists():
        from shards.demo import write_demo_data

        write_demo_data(data_dir)
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = args.variants.split(",")
    global CONFIG
    if args.scale != 1.0:
        CONFIG = replace(CONFIG, head_train=replace(CONFIG.head_train, steps=max(
            2, int(CONFIG.head_train.steps * args.scale)), warmup_steps=0))
    data = load_contributors(data_dir / "contributors")
    ids = [d.contributor_id for d in data]
    sizes = {d.contributor_id: len(d) for d in data}

    def one_x(variant: str) -> int:  # a shard's default steps
        train = CONFIG.lora_train if variant == "lora" else CONFIG.shard_train
        return max(2, int(train.steps * args.scale))

    reference = round(sum(sizes.values()) / len(ids))  # the mean contributor (default data: 154)

    def shard_steps(variant: str, m: float) -> dict[str, int]:
        """Steps of each shard at budget m, about 7 x one_x x m in all: by the store's
        own in-proportion rule with the mean contributor as reference (`data`), or
        one_x x m each (`equal`)."""
        steps = max(2, int(one_x(variant) * m))
        if args.allocation == "equal":
            return {c: steps for c in ids}
        rule = replace(CONFIG, steps_reference_images=reference,
                       shard_train=CONFIG.shard_train.with_steps(steps),
                       lora_train=CONFIG.lora_train.with_steps(steps))
        kind = "lora" if variant == "lora" else "full"
        return {c: rule.shard_train_for(kind, sizes[c]).steps for c in ids}

    base = one_x("cond")
    work = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="cdm-conditional-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"training into {work}", flush=True)
    base_path, base_info = None, None
    if "lora" in variants and (work / "lora-base.safetensors").exists():  # --reuse
        base_path, base_info = str(work / "lora-base.safetensors"), {"reused": True}
    elif "lora" in variants:  # the public base first: the LoRA jobs start from it
        base_path, base_info = _train_base(data_dir, work, args)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    specs = []
    for variant in variants:  # priority: variant, then budget; heads first
        specs += [{"kind": "head", "cid": c, "variant": variant, "steps": CONFIG.head_train.steps}
                  for c in ids]
        for m in budgets:
            steps = max(2, int(one_x(variant) * m))
            specs.append({"kind": "mono", "cid": "union", "variant": variant, "steps": steps * len(ids)})
            specs += [{"kind": "shard", "cid": c, "variant": variant, "steps": n}
                      for c, n in shard_steps(variant, m).items()]
    # longest first within a variant (the monoliths are the critical path), cond first
    specs.sort(key=lambda s: (variants.index(s["variant"]), -s["steps"]))
    for s in specs:
        s.update(data=data_dir, device=args.device, threads=threads, base=base_path,
                 out=str(work / f"{s['variant']}-{s['kind']}-{s['cid']}-{s['steps']}.safetensors"))
    start = time.perf_counter()
    done: dict[tuple, dict] = {}
    for s in specs:
        r = _reused(s)
        if r is not None:
            done[_key(r)] = r
    if done:
        print(f"reused {len(done)} of {len(specs)} trained models from {work}", flush=True)
    pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"))
    futures = {pool.submit(_job, s): s for s in specs if _key(s) not in done}
    try:
        for fut in as_completed(futures, timeout=args.deadline or None):
            r = fut.result()
            done[_key(r)] = r
            print(f"[{time.perf_counter() - start:6.0f} s] trained {r['variant']} {r['kind']} "
                  f"{r['cid']} ({r['steps']} steps, {r['seconds']:.0f} s, loss {r['loss']:.4f})",
                  flush=True)
    except TimeoutError:
        print(f"deadline: {len(done)} of {len(specs)} training jobs finished", flush=True)
    pool.shutdown(wait=False, cancel_futures=True)
    train_s = time.perf_counter() - start

    evaluator = DigitsEvaluator(data_dir / "heldout", seed=args.seed)
    from valuation.properties import load_heldout as heldout_folder

    heldout = heldout_folder(data_dir / "heldout")
    heldout_pm1 = load_labelled_folder(data_dir / "heldout")  # in [-1, 1], as trained on
    judge = LabelJudge(data_dir / "heldout", data_dir / "public", seed=args.seed)
    real = _real_on_label({"mlp": evaluator, "svm": judge}, data)
    real_all = _real_on_label({"mlp": evaluator, "svm": judge}, data, honest_only=False)
    print(f"judges on the honest contributors' own images, per label: {real}", flush=True)
    report = {"device": args.device, "jobs": args.jobs, "scale": args.scale, "n": args.n,
              "steps": args.steps, "per_label": args.per_label, "per_single": args.per_single,
              "shard_steps_1x": base, "allocation": args.allocation,
              "contributor_images": sizes, "contributors": ids, "train_seconds": train_s,
              "evaluator_accuracy": evaluator.accuracy, "judge_accuracy": judge.accuracy,
              "real_on_label": real, "real_on_label_all": real_all, "lora_base": base_info,
              "training": list(done.values()), "results": {}}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every budget, so a crash keeps what was measured
        (out / "conditional.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for variant in variants:
        num_labels = 0 if variant == "uncond" else 10
        vdata = [replace(d, labels=None) for d in data] if variant == "uncond" else data
        heads = {c: load_file(done[(variant, "head", c, CONFIG.head_train.steps)]["out"])
                 for c in ids if (variant, "head", c, CONFIG.head_train.steps) in done}
        for m in budgets:
            steps, per_shard = max(2, int(one_x(variant) * m)), shard_steps(variant, m)
            keys = ([(variant, "shard", c, per_shard[c]) for c in ids]
                    + [(variant, "mono", "union", steps * len(ids))])
            if len(heads) < len(ids) or not all(k in done for k in keys):
                print(f"{variant} {m}x: not trained in time; skipped")
                continue
            shards = {c: load_file(done[(variant, "shard", c, per_shard[c])]["out"]) for c in ids}
            sampler = _sampler(shards, heads, vdata, num_labels, args.device)
            mono_state = load_file(done[keys[-1]]["out"])
            mono = _sampler({"union": mono_state}, {}, [ContributorData(
                "union", torch.cat([d.images for d in vdata]), "-",
                None if not num_labels else torch.cat([d.labels for d in vdata]))], num_labels,
                args.device)
            t0 = time.perf_counter()
            if args.fd_only:
                f = _fd_seeds(sampler, mono, evaluator, vdata, args, mixture=False)
                report["results"][f"{variant}-{m:g}x"] = {
                    "budget": m, "fd": f["mean"], "fd_seeds": f, "shard_steps": per_shard,
                    "monolith_steps": steps * len(ids), "eval_seconds": time.perf_counter() - t0}
                print(f"{variant} {m:g}x {_fd_seeds_line(f)}", flush=True)
                save()
                continue
            result = _evaluate(sampler, mono, evaluator, judge, heldout, vdata, args, variant)
            if args.fd_seeds:
                result["fd_seeds"] = _fd_seeds(sampler, mono, evaluator, vdata, args)
                result["denoising"] = _generalisation(shards, mono_state, data, heldout_pm1,
                                                      num_labels, args.device, args.seed)
            result.update(budget=m, shard_steps=per_shard, monolith_steps=steps * len(ids),
                          eval_seconds=time.perf_counter() - t0)
            report["results"][f"{variant}-{m:g}x"] = result
            f = result["fd"]
            line = (f"{variant} {m:g}x ({steps} steps/shard, {args.allocation}): FD composed {f['composed']:.3f}, "
                    f"monolith {f['monolith']:.3f} ({f['gap']:+.1%})")
            if variant != "uncond":
                for judge_name, key in (("MLP", "on_label"), ("SVM", "on_label_svm")):
                    worst = min(result[key]["composed"].values())
                    worst_honest = min(result[key]["composed_honest"].values())
                    honest = [v for c, ys in result[key.replace("label", "label_single")].items()
                              if c != "mallory" for v in ys.values()]
                    line += (f"; on-label ({judge_name}) composed min {worst:.1%}, without "
                             f"mallory {worst_honest:.1%}, single honest contributors min "
                             f"{min(honest):.1%}")
            print(line, flush=True)
            if args.fd_seeds:
                print(_diagnosis_line(result), flush=True)
            save()
    save()
    _plot([report], out / "budget.png")
    print(f"wrote {out}/conditional.json and budget.png ({time.perf_counter() - start:.0f} s)")


def _plot(reports: list[dict], path: Path) -> None:
    """FD over the budget, composed and monolith, for each variant of each report; with
    several reports, runs of the same variant and split are joined into one curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"cond": "conditional", "uncond": "unconditional", "lora": "LoRA, conditional"}
    curves: dict[tuple, dict] = {}
    for report in reports:
        split = {"data": "proportional", "equal": "equal"}[
            report.get("allocation", "equal")]  # runs before --allocation split equally
        for key, r in report["results"].items():
            variant = key.rsplit("-", 1)[0]
            device = "H100" if "H100" in report["device"] else report["device"].split(" (")[0]
            fd = dict(r["fd"])
            if "fd_seeds" in r:  # the mean over seeds, with its standard error
                f = r["fd_seeds"]
                fd = {k: f["mean"][k] for k in ("composed", "monolith")} | {
                    f"{k}_se": f["sd"][k] / np.sqrt(len(f[k])) for k in ("composed", "monolith")}
            curves.setdefault((variant, split, device), {})[r["budget"]] = fd
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, ((variant, split, device), points) in enumerate(sorted(curves.items())):
        rows = sorted(points.items())  # one point per budget (a repeated run: the last)
        xs = [b for b, _ in rows]
        label = names.get(variant, variant) + (f", {split} split ({device})" if len(reports) > 1 else "")
        seeds = any("composed_se" in f for _, f in rows)
        for which, marker, style in (("composed", "o", "-"), ("monolith", "s", "--")):
            ax.errorbar(xs, [f[which] for _, f in rows], [f.get(f"{which}_se", 0) for _, f in rows]
                        if seeds else None, fmt=style, marker=marker, color=f"C{i}", capsize=3,
                        label=f"{which}: {label}" + (" (mean over seeds +- s.e.)" if seeds else ""))
    ax.set_xscale("log", base=2)
    budgets = sorted({b for points in curves.values() for b in points})
    ax.set_xticks(budgets, [f"{b:g}x" for b in budgets])
    ax.set_xlabel("training budget (x default steps per shard; monolith: 7x that)")
    ax.set_ylabel("FD to held-out digits (lower is better)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_denoising(reports: list[dict], path: Path) -> bool:
    """Denoising loss on training and on held-out digits over the budget, the monolith
    against the honest shards (mean, each on its own digits), from results that carry
    the diagnosis; False if none does."""
    points = {}
    for report in reports:
        for key, r in report["results"].items():
            if "denoising" in r and key.startswith("cond-"):
                dn = r["denoising"]
                honest = [v for c, v in dn["shards"].items() if c != "mallory"]
                points[r["budget"]] = {
                    "monolith, training": dn["monolith"]["train"],
                    "monolith, held-out": dn["monolith"]["heldout"],
                    "shards, training": np.mean([v["train"] for v in honest]),
                    "shards, held-out": np.mean([v["heldout"] for v in honest]),
                    "monolith on the shards' held-out digits": np.mean(
                        [v["monolith_heldout"] for v in honest])}
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"monolith, training": ("C1", "--", "s"), "monolith, held-out": ("C1", "-", "s"),
              "shards, training": ("C0", "--", "o"), "shards, held-out": ("C0", "-", "o"),
              "monolith on the shards' held-out digits": ("C1", ":", "^")}
    for name, (color, style, marker) in styles.items():
        ax.plot(xs, [points[x][name] for x in xs], style, marker=marker, color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{b:g}x" for b in xs])
    ax.set_xlabel("training budget (x default steps per shard; monolith: 7x that)")
    ax.set_ylabel("denoising loss (lower is better)")
    ax.set_title("class-conditional: honest shards (mean) against the monolith", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
    sys.stdout.flush()
    os._exit(0)  # do not wait for training jobs cut off by --deadline
