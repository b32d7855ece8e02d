"""A cell's generated samples on disk, so a new metric does not mean sampling again (`bench.run --save-samples`).

Format: ADM's sample batches (`arr_0`: uint8 [N, H, W, C], the array the ADM evaluator and most diffusion repos read)
plus `meta`, a JSON string with the cell (model, method, bits, seed, samples, sampler, dataset, git commit). Images
are stored as the uint8 values the Inception metrics see; digits-classifier metrics re-scored from them read these
8-bit images, which differ from the cell's float samples by less than half a gray level.
`python -m bench.evaluate --samples FILE.npz` re-scores a file.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError


def samples_path(root: str | os.PathLike, cell) -> Path:
    """<root>/<grid>/<model>/<method>/<bits>-seed<seed>-<cell key>.npz (':' of ablation names kept out of paths)."""
    safe = lambda s: str(s).replace(":", "_").replace("/", "_")  # noqa: E731
    return Path(root) / safe(cell.grid) / safe(cell.model) / safe(cell.method) / \
        f"{cell.bits}-seed{cell.seed}-{cell.key}.npz"


def _u8_nhwc(images: torch.Tensor) -> np.ndarray:
    from bench.metrics.data import to_uint8_rgb

    u8 = to_uint8_rgb(images.detach().cpu())  # the values Inception sees (1 channel repeated to RGB)
    if images.shape[1] == 1:
        u8 = u8[:, :1]
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


class SamplesWriter:
    """Writes an ADM-format .npz batch by batch: `arr_0` is streamed into the zip member, so a cell that saves 50k
    samples holds one batch of them. The file appears (atomically renamed) only when all `n` images were added.

        with SamplesWriter(path, n, meta) as w:
            for images in batches:      # [B, C, H, W] in [-1, 1]
                w.add(images)
    """

    def __init__(self, path: str | os.PathLike, n: int, meta: dict):
        self.path, self.n, self.meta = Path(path), int(n), meta
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex}.tmp.npz")
        self.zip = zipfile.ZipFile(self.tmp, "w", allowZip64=True)
        self.member = None
        self.written = 0

    def add(self, images: torch.Tensor) -> None:
        u8 = _u8_nhwc(images)
        if self.member is None:
            self.member = self.zip.open("arr_0.npy", "w", force_zip64=True)
            np.lib.format.write_array_header_1_0(self.member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": (self.n, *u8.shape[1:])})
        if self.written + len(u8) > self.n:
            raise BenchError(f"{self.path}: more than the {self.n} images announced")
        self.member.write(u8.tobytes())
        self.written += len(u8)

    def close(self) -> Path:
        if self.written != self.n:
            self.abort()
            raise BenchError(f"{self.path}: {self.written} images written, {self.n} announced")
        self.member.close()
        buf = io.BytesIO()
        np.save(buf, np.array(json.dumps(self.meta, sort_keys=True, default=str)), allow_pickle=False)
        self.zip.writestr("meta.npy", buf.getvalue())
        self.zip.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            if self.member is not None:
                self.member.close()
            self.zip.close()
        except (OSError, ValueError):
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_samples(images: torch.Tensor, path: str | os.PathLike, meta: dict) -> Path:
    """images in [-1, 1], [N, C, H, W] -> an ADM-format .npz (uint8 NHWC `arr_0` + JSON `meta`), written atomically."""
    with SamplesWriter(path, len(images), meta) as w:
        w.add(images)
    return w.path


def _bad(p: Path, why: str) -> BenchError:
    return BenchError(f"could not read samples {p} ({why}); expected a .npz with arr_0: uint8 [N, H, W, C]")


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"npy format version {version}")


def read_samples(path: str | os.PathLike, batch_size: int = 1024):
    """(n, meta, batches): the images of a saved-samples file or any ADM sample batch, read `batch_size` at a time
    from the zip member (bounded memory for 50k samples), each batch float [B, C, H, W] in [-1, 1]."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"no samples file at {p}; expected a .npz written by `bench.run --save-samples` or an ADM "
                         "sample batch (arr_0: uint8 [N, H, W, C])")
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if "arr_0.npy" not in names:
                raise _bad(p, "no arr_0")
            meta = {}
            if "meta.npy" in names:
                with z.open("meta.npy") as f:
                    meta = json.loads(str(np.load(io.BytesIO(f.read()), allow_pickle=False)))
            with z.open("arr_0.npy") as f:
                shape, fortran, dtype = _read_header(f)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise _bad(p, type(e).__name__) from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
        raise BenchError(f"{p}: arr_0 is {dtype} {shape}; expected uint8 [N, H, W, 1 or 3]")

    def batches():
        per = int(np.prod(shape[1:]))
        try:
            with zipfile.ZipFile(p) as z, z.open("arr_0.npy") as f:
                _read_header(f)
                for s in range(0, shape[0], batch_size):
                    k = min(batch_size, shape[0] - s)
                    buf = f.read(k * per)
                    if len(buf) != k * per:
                        raise _bad(p, "truncated arr_0")
                    arr = np.frombuffer(buf, np.uint8).reshape(k, *shape[1:])
                    yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise _bad(p, type(e).__name__) from None

    return int(shape[0]), meta, batches()


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """(images in [-1, 1] as float [N, C, H, W], meta) from a saved-samples file or any ADM sample batch (meta {})."""
    n, meta, batches = read_samples(path)
    parts = list(batches)
    return (torch.cat(parts) if parts else torch.empty(0)), meta
