"""A small classifier trained on held-out images (owned by nobody): its penultimate
layer is the feature space for the Frechet distance, its softmax gives class entropy
(diversity) and mean confidence. An MLP for tiny images (8x8 digits), a small CNN for
images of 16 pixels a side or more (the studios' 32x32 RGB emoji).

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


class ConvFeatureNet(torch.nn.Module):
    """CNN on images in [0, 1], (N, C, H, W) with H, W >= 16: three conv-ReLU stages
    (the first two halve the size), global average pooling -> 64-d features ->
    `classes` logits."""

    def __init__(self, channels: int = 3, classes: int = 10, width: int = 32, features: int = 64):
        super().__init__()
        conv = torch.nn.Conv2d
        self.body = torch.nn.Sequential(
            conv(channels, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(2 * width, features, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(features, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


FeatureNet = DigitsFeatureNet | ConvFeatureNet


def make_feature_net(shape: tuple[int, ...], classes: int) -> FeatureNet:
    """The evaluator's architecture for images of `shape` (C, H, W)."""
    if min(shape[1:]) >= 16:
        return ConvFeatureNet(channels=shape[0], classes=classes)
    return DigitsFeatureNet(in_features=int(np.prod(shape)), classes=classes)


def train_feature_net(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 400,
                      noise: float = 0.05, classes: int | None = None) -> FeatureNet:
    """Adam on held-out images in [0, 1] (N, C, H, W), with small Gaussian input noise
    as augmentation: the MLP full-batch for `epochs`, the CNN in minibatches of 128 for
    `epochs` // 8 passes. Deterministic for `seed` (and the thread count)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    classes = int(y.max()) + 1 if classes is None else classes
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # at least ten outputs, as the digits evaluator always had (unused ones never win)
        net = make_feature_net(tuple(x.shape[1:]), max(classes, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    conv = isinstance(net, ConvFeatureNet)
    for _ in range(epochs // 8 if conv else epochs):
        order = torch.randperm(len(x), generator=generator) if conv else torch.arange(len(x))
        for batch in order.split(128 if conv else len(x)):
            xb = (x[batch] + noise * torch.randn(x[batch].shape, generator=generator)).clamp(0, 1)
            loss = torch.nn.functional.cross_entropy(net(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def save_feature_net(net: FeatureNet, path: Path) -> None:
    save_file(net.state_dict(), str(path))


def load_feature_net(path: Path) -> FeatureNet:
    state = load_file(str(path))
    if "body.0.weight" in state:  # the CNN's first convolution
        w = state["body.0.weight"]
        net = ConvFeatureNet(channels=w.shape[1], classes=state["head.weight"].shape[0],
                             width=w.shape[0], features=state["head.weight"].shape[1])
    else:
        net = DigitsFeatureNet(in_features=state["body.1.weight"].shape[1],
                               classes=state["head.weight"].shape[0])
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
