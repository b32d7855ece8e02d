"""A cell's generated samples on disk, so a new metric does not mean sampling again (`bench.run --save-samples`).

Format: ADM's sample batches (`arr_0`: uint8 [N, H, W, C], the array the ADM evaluator and most diffusion repos read)
plus `meta`, a JSON string with the cell (model, method, bits, seed, samples, sampler, dataset, git commit). Images
are stored as the uint8 values the Inception metrics see; digits-classifier metrics re-scored from them read these
8-bit images, which differ from the cell's float samples by less than half a gray level.
`python -m bench.evaluate --samples FILE.npz` re-scores a file.
"""

from __future__ import annotations

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


def save_samples(images: torch.Tensor, path: str | os.PathLike, meta: dict) -> Path:
    """images in [-1, 1], [N, C, H, W] -> an ADM-format .npz (uint8 NHWC `arr_0` + JSON `meta`), written atomically."""
    from bench.metrics.data import to_uint8_rgb

    u8 = to_uint8_rgb(images.detach().cpu())  # the values Inception sees (1 channel repeated to RGB)
    if images.shape[1] == 1:
        u8 = u8[:, :1]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.{uuid.uuid4().hex}.tmp.npz")
    np.savez(tmp, arr_0=u8.permute(0, 2, 3, 1).numpy(), meta=np.array(json.dumps(meta, sort_keys=True, default=str)))
    os.replace(tmp, p)
    return p


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """(images in [-1, 1] as float [N, C, H, W], meta) from a saved-samples file or any ADM sample batch (meta {})."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"no samples file at {p}; expected a .npz written by `bench.run --save-samples` or an ADM "
                         "sample batch (arr_0: uint8 [N, H, W, C])")
    try:
        with np.load(p, allow_pickle=False) as z:
            arr = z["arr_0"]
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise BenchError(f"could not read samples {p} ({type(e).__name__}); expected a .npz with arr_0: uint8 "
                         "[N, H, W, C]") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise BenchError(f"{p}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 [N, H, W, 1 or 3]")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, meta
