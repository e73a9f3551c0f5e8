"""The embedded default data set, written as real PNG folders from scikit-learn's
bundled 8x8 digits (no download).

Split, per digit class, by a seeded shuffle:
  * 25% `heldout/<digit>/`  evaluation only, owned by nobody (labelled);
  * 15% `public/`           public data, owned by nobody (base model of LoRA shards);
  * 8 images a class        `mallory`, the planted low-quality contributor, whose
                            images are heavily corrupted (noise + pixel dropout);
  * the rest                the owners in OWNERS below; 8 and 9 are split between
                            `erin` and `frank`, the overlapping pair.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

OWNERS: dict[str, list[int]] = {
    "alice": [0, 1],
    "bob": [2, 3],
    "carol": [4, 5],
    "dave": [6, 7],
    "erin": [8, 9],
    "frank": [8, 9],
}
LOW_QUALITY = "mallory"
HELDOUT_FRACTION = 0.25
PUBLIC_FRACTION = 0.15
LOW_QUALITY_PER_CLASS = 8


def _corrupt(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy corruption in [0, 1]: Gaussian noise (std 0.45) and 40% pixel dropout."""
    noisy = images + rng.normal(0.0, 0.45, size=images.shape)
    noisy[rng.random(images.shape) < 0.4] = rng.random()
    return np.clip(noisy, 0.0, 1.0)


def _write_pngs(folder: Path, prefix: str, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        pixels = np.round(img * 255.0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{prefix}-{i:04d}.png")


def write_demo_data(out_dir: str | Path, seed: int = 0) -> dict:
    """Write the default data set under `out_dir` and return its ownership table.

    Layout: `contributors/<id>/*.png`, `public/*.png`, `heldout/<digit>/*.png`,
    `owners.json` (the returned table). Written to a sibling temp folder and renamed,
    so `out_dir` is either complete or absent.

    Raises:
        DataError: `out_dir` exists and is not empty.
    """
    final = Path(out_dir)
    if final.exists() and any(final.iterdir()):
        raise DataError(f"{final} exists and is not empty")
    out_dir = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        table = _write(out_dir, seed)
        if final.exists():
            final.rmdir()
        os.replace(out_dir, final)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return table


def _write(out_dir: Path, seed: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = digits.target
    rng = np.random.default_rng(seed)
    owned: dict[str, list[np.ndarray]] = {cid: [] for cid in [*OWNERS, LOW_QUALITY]}
    public, heldout_counts = [], {}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_held = int(round(HELDOUT_FRACTION * len(idx)))
        n_pub = int(round(PUBLIC_FRACTION * len(idx)))
        held, idx = idx[:n_held], idx[n_held:]
        pub, idx = idx[:n_pub], idx[n_pub:]
        low, idx = idx[:LOW_QUALITY_PER_CLASS], idx[LOW_QUALITY_PER_CLASS:]
        _write_pngs(out_dir / "heldout" / str(digit), f"heldout-{digit}", images[held])
        heldout_counts[digit] = len(held)
        public.append(images[pub])
        owned[LOW_QUALITY].append(_corrupt(images[low], rng))
        owners = [cid for cid, classes in OWNERS.items() if digit in classes]
        for k, part in enumerate(np.array_split(idx, len(owners))):
            owned[owners[k]].append(images[part])
    _write_pngs(out_dir / "public", "public", np.concatenate(public))
    table = {"seed": seed, "contributors": {}, "public_images": int(sum(map(len, public))),
             "heldout_images": heldout_counts}
    for cid, parts in owned.items():
        imgs = np.concatenate(parts)
        _write_pngs(out_dir / "contributors" / cid, cid, imgs)
        table["contributors"][cid] = {
            "classes": OWNERS.get(cid, list(range(10))),
            "images": int(len(imgs)),
            "corrupted": cid == LOW_QUALITY,
        }
    (out_dir / "owners.json").write_text(json.dumps(table, indent=2) + "\n")
    return table

