"""Image grids for people to look at."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, ncol: int | None = None, scale: int | None = None,
              pad: int = 1) -> Image.Image:
    """(N, C, H, W) in [0, 1] -> one PIL image, upscaled `scale`x (nearest) for viewing;
    by default to about 64 pixels a cell (8x for 8x8 digits, 2x for 32x32)."""
    n, c, h, w = images.shape
    scale = scale or max(1, 64 // max(h, w))
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.float32)
    arr = images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    pixels = np.round(grid * 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_grid(images: torch.Tensor, path: str | Path, **kwargs) -> None:
    make_grid(images, **kwargs).save(path)
