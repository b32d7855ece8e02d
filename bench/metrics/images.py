"""Sample grids as images: one layout shared by bench.sample, bench.evaluate and the harness's per-cell PNGs."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

from bench.metrics.data import to_uint8_rgb


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 1, pad: int = 2, pad_value: int = 255):
    """Images in [-1, 1] [N, C, H, W] -> a PIL image: `nrow` per row (default ceil(sqrt(N))), each image upscaled
    `scale` times (nearest, so 16x16 digits stay crisp), `pad` pixels of `pad_value` around and between them."""
    from PIL import Image

    x = to_uint8_rgb(images.float()).permute(0, 2, 3, 1).numpy()  # N, H, W, 3
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return Image.fromarray(grid)


def grid_png(images: torch.Tensor, **kwargs) -> bytes:
    """`grid_image` encoded as PNG bytes."""
    buf = io.BytesIO()
    grid_image(images, **kwargs).save(buf, format="PNG")
    return buf.getvalue()
