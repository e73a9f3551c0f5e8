"""What a density-ratio head reads of an image: pooled pixels, or their projection on
the public data's principal components (a trunk shared by every head).

A head's first layer maps the image, average-pooled to at most MAX_SIDE pixels a side
(D = 768 features for 32x32 RGB), to its hidden width H: D x H multiply-adds a sample
and a head, so N heads cost N D H, which at N = 128 is 0.45x one studios shard on a
CPU (docs/performance.md). A trunk shared by all heads makes that cost flat in N:
the features are first projected on the top F right singular vectors U (F x D) of
the public reference's pooled images, f = U x, and each head reads f (F x H a head;
F = 64 against D = 768 makes the heads' first layers 12x cheaper).

Why these directions: a noised image is x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, so
its second moment is a_t E[x_0 x_0^T] + (1 - a_t) I, whose eigenvectors are those
of the data's second moment at every t: the subspace that keeps the most signal
energy of a noised image is the same at every noise level, and the discarded
directions carry the least. The trunk is fit on the public data only, owned by nobody
as the reference is, and never changes when contributors come or go: forgetting
stays deleting the forgotten contributor's head. What it costs in routing quality is
measured in docs/performance.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save_file

MAX_SIDE = 16


def pooled(x_t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, D): the image average-pooled to at most MAX_SIDE a side;
    (B, D) features pass through unchanged."""
    if x_t.dim() == 2:
        return x_t
    h, w = x_t.shape[-2:]
    if max(h, w) > MAX_SIDE:
        x_t = F.adaptive_avg_pool2d(x_t, (min(h, MAX_SIDE), min(w, MAX_SIDE)))
    return x_t.flatten(1)


def feature_dim(image_shape: tuple[int, int, int]) -> int:
    """D: the number of pooled features of an image of shape (C, H, W)."""
    c, h, w = image_shape
    return c * min(h, MAX_SIDE) * min(w, MAX_SIDE)


class PublicTrunk(torch.nn.Module):
    """f = U pooled(x): the pooled image on F principal directions of public data."""

    FILE = "trunk.safetensors"

    def __init__(self, components: torch.Tensor):
        super().__init__()
        self.register_buffer("components", components.contiguous())

    @property
    def features(self) -> int:
        return self.components.shape[0]

    @classmethod
    def fit(cls, public: torch.Tensor, features: int) -> PublicTrunk:
        """The top `features` right singular vectors of the pooled public images
        (uncentred: the mean image is the first direction, as x_t's mean scales): the
        eigenvectors of their D x D second moment, each signed so that its largest
        entry is positive (the same trunk on any machine, up to rounding).

        Raises:
            ValueError: fewer public images than features, or no fewer pooled
                features than asked for (then a trunk saves nothing).
        """
        x = pooled(public.float())
        if features >= x.shape[1]:
            raise ValueError(f"a trunk of {features} features on images of {x.shape[1]} "
                             "pooled features saves nothing")
        if len(x) < features:
            raise ValueError(f"a trunk of {features} features needs at least as many "
                             f"public images; there are {len(x)}")
        x = x.double()
        _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
        top = vectors[:, -features:].flip(1).T  # (F, D), largest first
        signs = top.gather(1, top.abs().argmax(1, keepdim=True)).sign()
        return cls((top * signs).float())

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        return pooled(x_t) @ self.components.to(x_t.dtype).T

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.FILE
        save_file({"components": self.components.cpu()}, str(path))
        return path

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicTrunk:
        return cls(load(data)["components"])


def wanted(image_shape: tuple[int, int, int], features: int) -> bool:
    """Whether heads of images of `image_shape` read a trunk of `features` (0: never;
    a trunk no narrower than the pooled image saves nothing)."""
    return 0 < features < feature_dim(image_shape)


def fit_for(public: torch.Tensor, features: int) -> PublicTrunk | None:
    """The trunk of a store whose heads read `features` directions (`head_trunk`),
    fit on its `public` images: no more directions than images (they span no more);
    None where a trunk would save nothing."""
    features = min(features, len(public))
    return PublicTrunk.fit(public, features) if wanted(tuple(public.shape[1:]), features) else None


def head_width(image_shape: tuple[int, int, int], trunk: PublicTrunk | None) -> int:
    """The features a head reads: the trunk's, else the pooled image's."""
    return feature_dim(image_shape) if trunk is None else trunk.features
