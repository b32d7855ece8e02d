"""Reference data from what a user downloaded: the folder layout bench.metrics.reference reads
(`$EDA_BENCH_DATA/<dataset>/<split>/*.png`) and, optionally, its Inception statistics in the cache.

CIFAR-10: the python tarball of https://www.cs.toronto.edu/~kriz/cifar.html (`cifar-10-python.tar.gz`, holding
`cifar-10-batches-py/data_batch_1..5` and `test_batch`). Each batch is a pickle of {b"data": uint8 [10000, 3072]
(R, G, B planes of 32x32, row-major), b"labels", ...}; it is read with an unpickler that builds nothing but numpy
arrays, lists, dicts and bytes, so a tampered file cannot run code. Images are written as <index>.png (index within
the split, zero-padded), each file atomically, so an interrupted run resumes where it stopped and a rerun rewrites
nothing.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import uuid
from pathlib import Path

import numpy as np

from bench.errors import BenchError

CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _ArraysOnly(pickle.Unpickler):
    """Unpickler for the CIFAR batches: numpy arrays and plain containers only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _read_batch(data: bytes, name: str) -> np.ndarray:
    try:
        d = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
        arr = np.asarray(d[b"data"], dtype=np.uint8)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise BenchError(f"{name} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); expected the "
                         "cifar-10-python.tar.gz of https://www.cs.toronto.edu/~kriz/cifar.html") from None
    if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise BenchError(f"{name}: data is {arr.shape}; expected [N, 3072] (CIFAR-10 python format)")
    return arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC


def cifar10_batches(tarball: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The uint8 NHWC images of a CIFAR-10 split, batch by batch, from the python tarball."""
    p = Path(tarball)
    if not p.is_file():
        raise BenchError(f"no file at {p}; download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/"
                         "cifar.html and pass its path")
    try:
        with tarfile.open(p, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [b for b in CIFAR_SPLITS[split] if b not in members]
            if missing:
                raise BenchError(f"{p} has no {', '.join(missing)}; expected cifar-10-batches-py/"
                                 f"{{{', '.join(CIFAR_SPLITS[split])}}} (the CIFAR-10 python version)")
            return [_read_batch(tar.extractfile(members[b]).read(), b) for b in CIFAR_SPLITS[split]]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BenchError(f"could not read {p} as a tar archive ({type(e).__name__}); expected "
                         "cifar-10-python.tar.gz") from None


def write_images(images: np.ndarray, folder: Path, start: int, width: int, progress=None) -> int:
    """Write NHWC uint8 images as <start + i>.png, skipping files that exist (each written atomically); returns how
    many were written."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, img in enumerate(images):
        path = folder / f"{start + i:0{width}d}.png"
        if not path.is_file():
            tmp = folder / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.png"
            Image.fromarray(img).save(tmp)
            os.replace(tmp, path)
            written += 1
        if progress is not None:
            progress.update(1)
    return written


def prepare_cifar10(tarball, out_root: Path, splits=("train", "test"), show_progress: bool = True) -> dict:
    """{split: (images in the folder, newly written)} after writing the tarball's splits under out_root/cifar10."""
    from tqdm.auto import tqdm

    done = {}
    for split in splits:
        batches = cifar10_batches(tarball, split)
        total = sum(len(b) for b in batches)
        folder = Path(out_root) / "cifar10" / split
        with tqdm(total=total, desc=f"cifar10/{split}", unit="img", disable=not show_progress) as bar:
            start, written = 0, 0
            for b in batches:
                written += write_images(b, folder, start, len(str(total - 1)), bar)
                start += len(b)
        done[split] = (total, written)
    return done
