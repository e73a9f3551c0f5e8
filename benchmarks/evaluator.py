"""The digits evaluator the benchmarks share: an MLP trained on the held-out digits
(owned by nobody) classifies samples and gives the feature space of the Frechet
distance (FD) to the held-out digits; and the measurements built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from valuation.features import frechet_distance, gaussian_stats, train_feature_net
from valuation.properties import load_heldout


class DigitsEvaluator:
    """Fit on `heldout/<digit>/`; `accuracy` is measured on 20% held back from a
    second fit on the other 80% (the honest accuracy of the same recipe)."""

    def __init__(self, heldout: str | Path, seed: int = 0):
        x_held, y_held = load_heldout(Path(heldout))  # in [0, 1]
        self.net = train_feature_net(x_held, y_held, seed=seed)
        perm = np.random.default_rng(seed).permutation(len(y_held))
        cut = int(0.8 * len(perm))
        probe = train_feature_net(x_held[perm[:cut]], y_held[perm[:cut]], seed=seed)
        with torch.no_grad():
            pred = probe(torch.as_tensor(x_held[perm[cut:]])).argmax(1).numpy()
            self.accuracy = float((pred == y_held[perm[cut:]]).mean())
        self.reference = self.stats(torch.as_tensor(x_held))

    def classify(self, images: torch.Tensor) -> np.ndarray:
        """Predicted digit of each image in [0, 1]."""
        with torch.no_grad():
            return self.net(images).argmax(1).numpy()

    def stats(self, images: torch.Tensor) -> tuple:
        """Gaussian statistics of images in [0, 1] in the evaluator's features."""
        with torch.no_grad():
            return gaussian_stats(self.net.features(images).numpy())

    def fd(self, images: torch.Tensor, reference: tuple | None = None) -> float:
        """Frechet distance of images in [0, 1] to the held-out digits (or to the
        `stats` of other images)."""
        return frechet_distance(*self.stats(images), *(reference or self.reference))


class LabelJudge:
    """A second classifier, for on-label accuracy only: an RBF support-vector machine
    (scikit-learn) fit on the held-out and the public digits (owned by nobody). It is
    the stronger judge of which digit a sample shows: on the honest contributors' own
    images it is right 94.8-100% of the time per digit, the MLP above 88.5-99.0%
    (conditional.py's `real_on_label`), so it measures the models rather than the
    judge. `accuracy` is measured as DigitsEvaluator's: on 20% held back from a fit on
    the rest."""

    def __init__(self, *folders: str | Path, seed: int = 0):
        from sklearn.svm import SVC

        parts = [load_heldout(Path(f)) for f in folders]
        x = np.concatenate([x.reshape(len(x), -1) for x, _ in parts])
        y = np.concatenate([y for _, y in parts])
        self.svc = SVC(C=10, gamma="scale").fit(x, y)
        perm = np.random.default_rng(seed).permutation(len(y))
        cut = int(0.8 * len(perm))
        probe = SVC(C=10, gamma="scale").fit(x[perm[:cut]], y[perm[:cut]])
        self.accuracy = float((probe.predict(x[perm[cut:]]) == y[perm[cut:]]).mean())

    def classify(self, images: torch.Tensor) -> np.ndarray:
        """Predicted digit of each image in [0, 1]."""
        return self.svc.predict(np.asarray(images).reshape(len(images), -1))


def pair_attribution(evaluator: DigitsEvaluator, out, classes: dict[str, list[int]]) -> dict:
    """For samples of a pair with disjoint digits: how often the largest attribution
    goes to the owner of the digit the sample shows, and the mean mass on it."""
    pair = out.contributor_ids
    digits = evaluator.classify(out.images)
    owner = np.where(np.isin(digits, classes[pair[0]]), 0,
                     np.where(np.isin(digits, classes[pair[1]]), 1, -1))
    valid = owner >= 0
    top = out.attribution_mean.argmax(1).numpy()
    mass = out.attribution_mean.numpy()[np.arange(len(owner)), np.clip(owner, 0, 1)]
    return {
        "pair": pair, "samples": int(len(owner)), "samples_in_pair_digits": int(valid.sum()),
        "argmax_is_owner": float((top[valid] == owner[valid]).mean()),
        "mean_mass_on_owner": float(mass[valid].mean()),
        "argmax_is_owner_last_step": float(
            (out.attribution_last.argmax(1).numpy()[valid] == owner[valid]).mean()),
    }
