"""A small digits classifier trained on the held-out digits (owned by nobody): its
penultimate layer is the feature space for the Frechet distance, its softmax gives
class entropy (diversity) and mean confidence.

Frechet distance between Gaussians fitted to features (Heusel et al. 2017, eq. 6):
    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file


class DigitsFeatureNet(torch.nn.Module):
    """MLP on images in [0, 1]: (N, C, H, W) -> 64-d features -> 10 logits."""

    def __init__(self, in_features: int = 64, hidden: int = 128, features: int = 64, classes: int = 10):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, features), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(features, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def train_feature_net(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 400,
                      noise: float = 0.05) -> DigitsFeatureNet:
    """Full-batch Adam on held-out digits in [0, 1], with small Gaussian input noise
    as augmentation. Deterministic for `seed`."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet(in_features=int(np.prod(x.shape[1:])))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        xb = (x + noise * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(net(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def save_feature_net(net: DigitsFeatureNet, path: Path) -> None:
    save_file(net.state_dict(), str(path))


def load_feature_net(path: Path) -> DigitsFeatureNet:
    state = load_file(str(path))
    net = DigitsFeatureNet(in_features=state["body.1.weight"].shape[1])
    net.load_state_dict(state)
    return net.eval()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Eq. (6). `eps` on the diagonals keeps the product's square root defined when a
    feature has zero variance (a ReLU unit that never fires); its effect on the
    distance is O(eps * dim). The square root's tiny imaginary part is dropped."""
    offset = eps * np.eye(sigma1.shape[0])
    covmean = np.real(scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
