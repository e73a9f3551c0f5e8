"""Reference numbers of tiny seeded stores, to hold a restructuring of the code to
"behaviour unchanged": the same images and the same Shapley values for the same seeds.

`python tests/golden.py OUT.json` writes them (run once on the code of before; the
file is tests/data/golden.json); tests/test_golden.py computes them again and compares.
Only public library calls are used, so the same script runs on old and new code.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards import ShardStore, StoreConfig, TrainConfig, load_contributors
from shards.data import load_labelled_folder
from shards.sampler import SampleRequest

TINY = TrainConfig(steps=12, batch_size=8, warmup_steps=2)
SAMPLE = {"n": 6, "steps": 8, "seed": 3}


def _write(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img, mode="L").save(folder / f"img-{i:03d}.png")


def write_data(root: Path) -> None:
    """contributors a={0}, b={1}, c={2} (20 digits each, unlabelled); public: 30 of 3..9;
    labelled/ a={0,1}, b={1,2}, c={3} (8 a label) with public 0..3; heldout/ 12 a digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = np.round(digits.images / 16 * 255).astype(np.uint8)
    for cid, digit in [("a", 0), ("b", 1), ("c", 2)]:
        _write(root / "contributors" / cid, imgs[digits.target == digit][:20])
    _write(root / "public", imgs[digits.target >= 3][:30])
    for cid, labels in {"a": [0, 1], "b": [1, 2], "c": [3]}.items():
        for y in labels:
            _write(root / "labelled" / cid / str(y), imgs[digits.target == y][20:28])
    for y in range(4):
        _write(root / "labelled-public" / str(y), imgs[digits.target == y][40:46])
    for d in range(10):
        _write(root / "heldout" / str(d), imgs[digits.target == d][-12:])


def _sample(store: ShardStore, pair: tuple[str, str] = ("a", "b")) -> dict:
    sampler = store.load_sampler("cpu")
    out = {}
    for name, contributors in (("all", None), ("pair", pair)):
        request = SampleRequest(contributors, SAMPLE["n"], SAMPLE["seed"])
        res = sampler.sample_batch([request], steps=SAMPLE["steps"])[0]
        out[name] = {"image_sums": res.images.double().sum(dim=(1, 2, 3)).tolist(),
                     "pixels": res.images[:, 0, 3, :].double().flatten().tolist(),
                     "attribution": res.attribution_mean.double().sum(0).tolist()}
    return out


def compute(work: Path) -> dict:
    """Every reference number, from stores built under `work`, on one thread (torch's
    and the BLAS's): the values depend on the thread count in their last digits
    (tests/test_golden.py), and one thread is what every machine and every test
    worker can give."""
    from threadpoolctl import threadpool_limits  # numpy's BLAS (scikit-learn's dependency)

    with one_thread(), threadpool_limits(1):
        return _compute(work)


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside, its thread count of before restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _compute(work: Path) -> dict:
    write_data(work / "data")
    data = work / "data"
    torch.manual_seed(0)
    datasets = load_contributors(data / "contributors")
    public = load_labelled_folder(data / "public")[0]
    base = dict(shard_train=TINY, base_train=TINY, lora_train=TINY, classifier_train=TINY,
                classifier_update_steps=4, head_train=TINY)
    configs = {"heads": StoreConfig(**base), "joint": StoreConfig(**base, router="joint"),
               "lora": StoreConfig(**base, kind="lora")}
    result = {}
    for name, config in configs.items():
        store = ShardStore.create(work / name, datasets, config, public=public, device="cpu",
                                  progress=False)
        result[name] = _sample(store)
    labelled = load_contributors(data / "labelled")
    pub, pub_labels = load_labelled_folder(data / "labelled-public")
    store = ShardStore.create(work / "labelled", labelled, StoreConfig(**base), public=pub,
                              public_labels=pub_labels, device="cpu", progress=False)
    result["labelled"] = _sample(store)
    from valuation.run import ValuationSettings, run_valuation

    settings = ValuationSettings(property="quality", methods=("exact",), n=16, steps=3,
                                 lds_coalitions=6, top_k=2)
    _, values = run_valuation(work / "heads", settings, heldout=data / "heldout",
                              progress=False)
    exact = values["exact"]
    result["shapley"] = {"players": list(exact.players), "values": exact.values.tolist(),
                         "u_full": exact.u_full, "u_empty": exact.u_empty}
    result["methods"] = _methods(work, data, datasets, base)
    result["add_forget"] = _add_forget(work, data, public, base)
    return result


def _methods(work: Path, data: Path, datasets, base: dict) -> dict:
    """Every valuation method on a tiny joint store that keeps its data (the sampled
    estimators, the pruned fine-tune and the retrain included), tiny settings."""
    from shards import StoreConfig
    from valuation.run import ValuationSettings, run_valuation

    store = ShardStore.create(work / "valued", datasets, StoreConfig(**base, router="joint"),
                              device="cpu", progress=False)
    settings = ValuationSettings(
        property="quality", n=8, steps=2, lds_coalitions=4, top_k=1, max_evaluations=6,
        monolith_steps=6, finetune_steps=4, subset_steps=2, retrain_steps=4,
        methods=("exact", "permutation", "kernelshap", "banzhaf", "banzhaf-msr",
                 "beta-shapley", "pruned", "retrain", "loo", "attribution"))
    _, results = run_valuation(store.root, settings, heldout=data / "heldout", progress=False)
    return {m: r.values.tolist() for m, r in results.items()}


def _add_forget(work: Path, data: Path, public, base: dict) -> dict:
    """A heads store of a and b, then c added, then a forgotten: what it samples."""
    from shards import StoreConfig, load_contributor

    ab = [d for d in load_contributors(data / "contributors") if d.contributor_id != "c"]
    store = ShardStore.create(work / "changing", ab, StoreConfig(**base), public=public,
                              device="cpu", progress=False)
    store.add(load_contributor(data / "contributors" / "c"), device="cpu", progress=False)
    store.exclude("a")
    store.purge("a")
    return _sample(ShardStore.open(store.root), ("b", "c"))


if __name__ == "__main__":
    import os

    os.environ.setdefault("CDM_SOLO_ROWS", "32")  # as tests/conftest.py: a fixed split
    with tempfile.TemporaryDirectory() as tmp:
        numbers = compute(Path(tmp))
    Path(sys.argv[1]).write_text(json.dumps(numbers, indent=1) + "\n")
    print(f"wrote {sys.argv[1]}")
