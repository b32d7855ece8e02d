"""scikit-learn's bundled digits (8x8, 1797 images) as a small image dataset with a fixed held-out split.

The split is stratified by class with a fixed seed, so every machine sees the same train/test images.
Images are upsampled to `size` x `size` with bilinear interpolation and scaled to [-1, 1] (the DDPM convention).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UsageError

SPLIT_SEED = 0
TEST_FRACTION = 0.2
DEFAULT_SIZE = 16


@functools.lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    tr, te = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=d.target)
    return d.images.astype(np.float32), d.target.astype(np.int64), np.sort(tr), np.sort(te)


def load_digits_split(split: str = "train", size: int = DEFAULT_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N,1,size,size] in [-1,1], labels [N]) for split 'train', 'test' or 'all'."""
    images, labels, tr, te = _split_indices()
    if split == "train":
        sel = tr
    elif split == "test":
        sel = te
    elif split == "all":
        sel = np.arange(len(labels))
    else:
        raise UsageError(f"unknown digits split {split!r}; expected one of: train, test, all")
    x = torch.from_numpy(images[sel]).unsqueeze(1) / 16.0  # sklearn digits are 0..16
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return x, torch.from_numpy(labels[sel])


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1,1] with 1 or 3 channels -> uint8 NCHW with 3 channels (what Inception expects)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UsageError(f"expected an image tensor of shape [N, 1 or 3, H, W], got {tuple(x.shape)}")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
