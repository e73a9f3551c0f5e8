"""Global properties of a batch of samples (images in [0, 1], (N, C, H, W)).

With the digits evaluator (`features.py`, trained on held-out digits owned by nobody,
stored once per store under STORE/valuation/evaluator/):

    quality    = -FD(samples, held-out)  Frechet distance in the evaluator's features
    diversity  = H(mean_x p(y | x))      entropy (nats) of the mean predicted class distribution
    confidence = mean_x max_y p(y | x)   mean top-class probability (Inception-score-like)
    precision  = share of samples inside the k-NN ball of some held-out digit     (fidelity)
    recall     = share of held-out digits inside the k-NN ball of some sample     (coverage)
                 (Kynkaanniemi et al. 2019, improved precision and recall; k = 3; a
                 ball's radius is the distance to its centre's k-th nearest neighbour
                 in its own set, in the evaluator's feature space)

aesthetic = mean of a linear head on normalised CLIP image embeddings (LAION's
aesthetic predictor v1 has this form); the CLIP model is a local transformers folder
(core install) or an open_clip checkpoint file (`pip install '.[clip]'`), the head a
local safetensors file, both given by the user, never downloaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shards.data import load_image_folder
from shards.errors import DataError
from shards.files import files_hash, write_json_atomic
from shards.settings import PROPERTIES

from .features import (
    frechet_distance,
    gaussian_stats,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (OpenAI)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PR_K = 3  # neighbours that set a ball's radius (precision, recall)
EVALUATOR_FORMAT = 2  # 2: the held-out features are stored (precision, recall)


def evaluator_dir(store_root: str | Path) -> Path:
    return Path(store_root) / "valuation" / "evaluator"


def load_heldout(heldout: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images in [0, 1] and labels from `heldout/<label>/*` (integer folder names)."""
    root = Path(heldout)
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) \
        if root.is_dir() else []
    if not folders or not all(p.name.isdigit() for p in folders):
        raise DataError(f"held-out folder {root} must hold one sub-folder per class, "
                        f"named 0, 1, ...; found {[p.name for p in folders]}")
    images, labels = [], []
    for folder in folders:
        x = load_image_folder(folder)
        images.append((x.numpy() + 1) / 2)
        labels += [int(folder.name)] * len(x)
    return np.concatenate(images).astype(np.float32), np.asarray(labels)


def build_evaluator(store_root: str | Path, heldout: str | Path, seed: int = 0) -> Path:
    """Train the digits evaluator on `heldout` and store it with the held-out feature
    statistics. Returns its folder. Rebuilt when the held-out data or the seed
    changed (the property key hashes the evaluator's files, so cached utilities of
    the old evaluator are not reused)."""
    images, labels = load_heldout(heldout)
    data_hash = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    folder = evaluator_dir(store_root)
    meta_path = folder / "evaluator.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["heldout_hash"] == data_hash and meta.get("seed") == seed \
                and meta.get("format") == EVALUATOR_FORMAT:
            return folder  # the same data and seed train the same evaluator
    folder.mkdir(parents=True, exist_ok=True)
    net = train_feature_net(images, labels, seed=seed)
    with torch.no_grad():
        feats = net.features(torch.as_tensor(images)).numpy().astype(np.float64)
        accuracy = float((net(torch.as_tensor(images)).argmax(1).numpy() == labels).mean())
    mu, sigma = gaussian_stats(feats)
    save_feature_net(net, folder / "model.safetensors")
    save_file({"mu": torch.as_tensor(mu), "sigma": torch.as_tensor(sigma),
               "features": torch.as_tensor(feats)}, str(folder / "reference.safetensors"))
    write_json_atomic(meta_path, {"heldout": str(heldout), "heldout_hash": data_hash,
                                  "images": len(labels), "classes": int(labels.max()) + 1,
                                  "train_accuracy": accuracy, "seed": seed,
                                  "format": EVALUATOR_FORMAT})
    return folder


class DigitsProperty:
    """quality / diversity / confidence with the store's evaluator."""

    def __init__(self, store_root: str | Path, name: str):
        folder = evaluator_dir(store_root)
        if not (folder / "evaluator.json").exists():
            raise DataError(f"store {store_root} has no evaluator yet: build it from "
                            "held-out digits first (`cdm value --heldout DIR`)")
        self.name = name
        self.net = load_feature_net(folder / "model.safetensors")
        ref = load_file(str(folder / "reference.safetensors"))
        self.mu, self.sigma = ref["mu"].numpy(), ref["sigma"].numpy()
        self.reference = ref.get("features")
        if name in ("precision", "recall"):
            if self.reference is None:
                raise DataError(f"the evaluator of store {store_root} predates {name}: rebuild "
                                "it from the held-out digits (`cdm value --heldout DIR`)")
            self.ref_radii = knn_radii(self.reference.double(), PR_K)
        self.key = f"{name}:k{PR_K}:{files_hash(folder)}" if name in ("precision", "recall") \
            else f"{name}:{files_hash(folder)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        x = images.float()
        if self.name == "quality":
            return -frechet_distance(*gaussian_stats(self.net.features(x).double().numpy()),
                                     self.mu, self.sigma)
        if self.name in ("precision", "recall"):
            fake, real = self.net.features(x).double(), self.reference.double()
            if self.name == "precision":
                return inside_any_ball(fake, real, self.ref_radii)
            return inside_any_ball(real, fake, knn_radii(fake, PR_K))
        probs = F.softmax(self.net(x).double(), dim=1)
        if self.name == "confidence":
            return float(probs.max(1).values.mean())
        mean = probs.mean(0)
        return float(-(mean * mean.clamp_min(1e-300).log()).sum())


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set (the
    whole set when it has no more than k others)."""
    d = torch.cdist(points, points)
    k = min(k, len(points) - 1)
    return d.kthvalue(k + 1, dim=1).values if k >= 1 else torch.full((len(points),), torch.inf)


def inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of `queries` within distance radii[j] of some centre j."""
    return float((torch.cdist(queries, centres) <= radii[None, :]).any(1).double().mean())


class AestheticProperty:
    """Mean linear aesthetic score on L2-normalised CLIP image embeddings (the form of
    LAION's aesthetic predictor v1: a linear head on ViT-L/14 embeddings).

    Args (the `aesthetic` dict): checkpoint: a local CLIP folder in transformers'
        layout (CLIPModel or CLIPVisionModelWithProjection, `save_pretrained`; runs in
        the core install), or a local open_clip checkpoint file with `arch` (its model
        name; `pip install '.[clip]'`); head: a local safetensors file with `weight`
        (1, D) and `bias` (1,).

    Raises:
        DataError: a path that is not local, a head of another width than the
            embeddings, open_clip missing for a checkpoint file.
    """

    def __init__(self, checkpoint: str, head: str, arch: str | None = None):
        for path in (checkpoint, head):
            if not path or not Path(path).exists():
                raise DataError(f"aesthetic: {path} is not a local file or folder (nothing "
                                "is downloaded)")
        if Path(checkpoint).is_dir():
            self._transformers(Path(checkpoint))
        else:
            self._open_clip(arch, checkpoint)
        weights = load_file(head)
        self.weight, self.bias = weights["weight"].float(), weights["bias"].float()
        if self.weight.shape[-1] != self.dim:
            raise DataError(f"aesthetic: the head takes {self.weight.shape[-1]} features, the "
                            f"CLIP model's embeddings have {self.dim}")
        digest = hashlib.sha256(files_hash(Path(checkpoint)).encode() if Path(checkpoint).is_dir()
                                else Path(checkpoint).read_bytes())
        digest.update(Path(head).read_bytes())
        self.key = f"aesthetic:{arch or 'transformers'}:{digest.hexdigest()}"

    def _transformers(self, folder: Path) -> None:
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
        self.size, self.dim = model.config.image_size, model.config.projection_dim
        pre = folder / "preprocessor_config.json"
        config = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(config.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(config.get("image_std", CLIP_STD)).view(1, 3, 1, 1)
        self.embed = lambda x: model(pixel_values=x).image_embeds

    def _open_clip(self, arch: str | None, checkpoint: str) -> None:
        try:
            import open_clip
        except ImportError as err:
            raise DataError("an open_clip checkpoint file needs the optional extra: pip "
                            "install '.[clip]' (or give a transformers CLIP folder)") from err
        if not arch:
            raise DataError("aesthetic: an open_clip checkpoint file needs its model name "
                            "(--clip-arch)")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
        model.eval()
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, tuple | list) else size
        self.dim = model.visual.output_dim
        norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
        self.mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std).view(1, 3, 1, 1)
        self.embed = model.encode_image

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        emb = F.normalize(self.embed((x.clamp(0, 1) - self.mean) / self.std).float(), dim=-1)
        return float((emb @ self.weight.T + self.bias).mean())


def load_property(store_root: str | Path, name: str,
                  aesthetic: dict | None = None) -> Callable[[torch.Tensor], float]:
    """The measure for property `name`; it has a `.key` naming it and its weights.

    Raises:
        ValueError: unknown property, or aesthetic without its paths.
        DataError: no evaluator in the store; open_clip missing; paths not files.
    """
    if name not in PROPERTIES:
        raise ValueError(f"property={name!r}; allowed: {list(PROPERTIES)}")
    if name == "aesthetic":
        if not aesthetic or not aesthetic.get("checkpoint") or not aesthetic.get("head"):
            raise ValueError("property 'aesthetic' needs a local CLIP checkpoint (a transformers "
                             "CLIP folder, or an open_clip file and its arch) and a head "
                             "(--clip-checkpoint, --aesthetic-head)")
        return AestheticProperty(**aesthetic)
    return DigitsProperty(store_root, name)
