"""Prompts on the studios: does a text-conditional store draw what the prompt names,
in the style of the studio asked for? Prints tables, writes
benchmarks/results/prompts/prompts.json and grids; never passes or fails on numbers.

Judges of our own (benchmarks/studios.py's recipe, CNNs whose softmax is averaged):
  category  which of the 9 categories an image shows, trained on every studio's
            contributed drawings, its accuracy measured on the held-out and public
            drawings (concepts it never saw)
  style     which studio drew it (studios.py `StyleJudge`)

Prompt sets, per category (the captions are CLDR names, "red apple"):
  seen      captions of concepts in the contributors' split (what the shards saw)
  unseen    captions of held-out concepts: no shard saw the concept or its caption
  category  a paraphrase naming the category, which no caption contains ("food or a
            drink", "an animal or a plant", "a flag", ...)
For each prompt, --per-prompt samples over all studios (the default routing), at each
--guidance; adherence is the share judged as the prompt's category, against chance
(the share of unprompted samples judged as that category, averaged over categories)
and against the label-conditional store (`--label-store`, the category as its label)
where one is given.

Style with prompts: for each honest studio, `contributors=[studio]` with the seen
prompts, the share the style judge assigns to that studio.

    .venv/bin/python benchmarks/prompts.py --store var/studios-text-store \\
        --label-store var/studios-store
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shards import ShardStore
from shards.images import save_grid
from shards.routing import Routing
from shards.sampler import SampleRequest
from valuation.features import train_feature_net

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studios import StyleJudge, _image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "prompts"
SHOWCASE = ["red apple", "grinning face", "red heart", "flag: Japan", "dog face", "rocket",
            "an animal or a plant", "food or a drink"]  # rows of showcase.png, guidance 3
CATEGORY_PROMPTS = ["a smiling or sad face", "a person or a body part", "an animal or a plant",
                    "food or a drink", "a vehicle, a building or a place",
                    "a sport, a game or a celebration", "an everyday object or a tool",
                    "a sign or a symbol", "the flag of a country"]


def concepts(data: Path) -> list[dict]:
    with open(data / "concepts.csv") as f:
        return list(csv.DictReader(f))


class CategoryJudge:
    """Which category an image shows (module docstring)."""

    def __init__(self, data: Path, rows: list[dict], categories: list[str], seeds: int = 3):
        def load(split):
            part = [r for r in rows if r["split"] in split and r["studio"] != "copycat"]
            x = torch.cat([(_image(data / r["file"]) + 1) / 2 for r in part]).numpy()
            return x, np.asarray([categories.index(r["category"]) for r in part])

        x, y = load(("contributors",))
        self.nets = [train_feature_net(x, y, seed=s, epochs=240, classes=len(categories))
                     for s in range(seeds)]
        px, py = load(("heldout", "public"))
        pred = self.predict(torch.as_tensor(px))
        self.accuracy = float((pred == py).mean())
        self.per_category = {c: float((pred[py == k] == k).mean()) for k, c in enumerate(categories)}

    def predict(self, images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            probs = [net(images.float())[:, :9].softmax(1) for net in self.nets]
            return torch.stack(probs).mean(0).argmax(1).numpy()


def prompt_sets(rows: list[dict], categories: list[str], per_category: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sets: dict[str, list[tuple[str, int]]] = {"seen": [], "unseen": [], "category": []}
    for k, cat in enumerate(categories):
        for name, split in (("seen", "contributors"), ("unseen", "heldout")):
            caps = sorted({r["caption"] for r in rows if r["category"] == cat and r["split"] == split})
            pick = rng.choice(len(caps), size=min(per_category, len(caps)), replace=False)
            sets[name] += [(caps[i], k) for i in sorted(pick)]
        sets["category"].append((CATEGORY_PROMPTS[k], k))
    return sets


def sample_many(sampler, requests: list[SampleRequest], steps: int, chunk: int = 256
                ) -> list[torch.Tensor]:
    """Each request's images, sampled in batches of about `chunk` rows (a request's
    images do not depend on its batch)."""
    out, group, rows = [], [], 0
    for req in [*requests, None]:
        if req is None or (group and rows + req.n > chunk):
            out += [o.images for o in sampler.sample_batch(
                group, steps, routing=Routing.parse(None, None, None))]
            group, rows = [], 0
        if req is not None:
            group.append(req)
            rows += req.n
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="var/studios-data")
    parser.add_argument("--store", default="var/studios-text-store")
    parser.add_argument("--label-store", default=None, help="a label store of the same data")
    parser.add_argument("--per-category", type=int, default=5, help="prompts per category and set")
    parser.add_argument("--per-prompt", type=int, default=8, help="samples per prompt")
    parser.add_argument("--category-n", type=int, default=40, help="samples per category prompt")
    parser.add_argument("--guidance", default="1,3")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--judges", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "prompts.json"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = Path(args.data)
    rows = concepts(data)
    categories = sorted({r["category"] for r in rows}, key=lambda c: int(next(
        r["file"].split("/")[-2] for r in rows if r["category"] == c)))
    owners = json.loads((data / "owners.json").read_text())["contributors"]
    honest = [c for c, e in owners.items() if not e["planted"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = ShardStore.open(args.store)
    sampler = store.load_sampler("cpu")
    judge = CategoryJudge(data, rows, categories, args.judges)
    style = StyleJudge(data, honest, seeds=args.judges)
    print(f"[judges] category {judge.accuracy:.1%} on held-out and public drawings (chance "
          f"{1 / len(categories):.1%}); style {style.accuracy:.1%}", flush=True)
    result = {"machine": "2-core CPU, no GPU", "settings": vars(args), "categories": categories,
              "category_judge_accuracy": judge.accuracy,
              "category_judge_per_category": judge.per_category,
              "style_judge_accuracy": style.accuracy}
    # chance: unprompted samples' categories
    free = torch.cat(sample_many(sampler, [SampleRequest(None, 100, s) for s in range(2)],
                                 args.steps))
    shows = sample_many(sampler, [SampleRequest(None, 8, 0, prompt=p, guidance=3.0)
                                  for p in SHOWCASE], args.steps)
    save_grid(torch.cat(shows), RESULTS / "showcase.png", ncol=8)
    free_share = np.bincount(judge.predict(free), minlength=len(categories)) / len(free)
    result["unprompted_category_shares"] = dict(zip(categories, free_share.tolist(), strict=True))
    sets = prompt_sets(rows, categories, args.per_category, seed=0)
    result["prompts"] = {k: [p for p, _ in v] for k, v in sets.items()}
    for g in [float(x) for x in args.guidance.split(",")]:
        res = result.setdefault(f"guidance {g:g}", {})
        for name, prompts in sets.items():
            n = args.category_n if name == "category" else args.per_prompt
            hits = np.zeros(len(categories))
            totals = np.zeros(len(categories))
            grid = []
            outs = sample_many(sampler, [SampleRequest(None, n, 1000 + i, prompt=p, guidance=g)
                                         for i, (p, _) in enumerate(prompts)], args.steps)
            for (_, k), imgs in zip(prompts, outs, strict=True):
                hits[k] += float((judge.predict(imgs) == k).sum())
                totals[k] += n
                grid.append(imgs[:8])
            per = hits / np.maximum(totals, 1)
            res[name] = {"adherence": float(hits.sum() / totals.sum()),
                         "per_category": dict(zip(categories, per.tolist(), strict=True)),
                         "chance": float(np.mean(free_share))}
            save_grid(torch.cat(grid)[:96], RESULTS / f"{name}-g{g:g}.png", ncol=8)
            print(f"[g={g:g}] {name:8s} adherence {res[name]['adherence']:.1%} (chance "
                  f"{np.mean(free_share):.1%}); " + ", ".join(
                      f"{c[:10]} {p:.0%}" for c, p in zip(categories, per, strict=True)),
                  flush=True)
        shares = {}
        for s in honest:
            imgs = torch.cat(sample_many(sampler, [
                SampleRequest((s,), 4, 2000 + i, prompt=p, guidance=g)
                for i, (p, _) in enumerate(sets["seen"][::2])], args.steps))
            shares[s] = style.shares(imgs)[s]
        res["style_with_prompts"] = shares
        print(f"[g={g:g}] style with prompts: " + ", ".join(f"{s} {v:.0%}" for s, v in shares.items()),
              flush=True)
    if args.label_store:
        lab = ShardStore.open(args.label_store).load_sampler("cpu")
        outs = sample_many(lab, [SampleRequest(None, args.category_n, 3000 + k, (k,))
                                 for k in range(len(categories))], args.steps)
        hits = [float((judge.predict(imgs) == k).mean()) for k, imgs in enumerate(outs)]
        result["label_store_adherence"] = {"adherence": float(np.mean(hits)),
                                           "per_category": dict(zip(categories, hits, strict=True))}
        print(f"[label store] category as label: adherence {np.mean(hits):.1%}", flush=True)
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
