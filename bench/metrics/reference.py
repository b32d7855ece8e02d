"""Reference data: where datasets and caches live, the reference images of a dataset split and their Inception
statistics, computed once and cached as .npz under `$EDA_BENCH_CACHE` (default ~/.cache/eda-bench), keyed by dataset,
split, extractor, FID mode and resolution; `reference_available` answers "can these metrics run?" without reading
an image.

Precomputed statistics (`load_stats_file`) are accepted in the two formats papers publish: clean-fid's
(`mu`, `sigma`: pool_3 mean and covariance) and the ADM evaluator's reference batches (`mu`, `sigma` and the spatial
`mu_s`, `sigma_s`; its `arr_0` images are not read). They hold no per-image features, so KID and precision/recall
are NaN against them. `describe_reference` is the one line each result row records: which set, how many images,
a hash of the statistics, the extractor and the mode.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError
from bench.metrics.data import to_uint8_rgb
from bench.metrics.names import ALL_METRICS, DIGITS_METRICS, INCEPTION_METRICS, check_requests

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def cache_dir() -> Path:
    return Path(os.environ.get("EDA_BENCH_CACHE") or Path.home() / ".cache" / "eda-bench")


def data_dir() -> Path:
    """Where folder datasets (cifar10, lsun, imagenet, coco, ...) are looked up: `$EDA_BENCH_DATA/<dataset>/<split>`."""
    return Path(os.environ.get("EDA_BENCH_DATA") or cache_dir() / "data")


def _reference_folder(dataset: str, split: str, reference_dir) -> Path:
    return Path(reference_dir) if reference_dir is not None else data_dir() / dataset / split


PREPARE_HINTS = {  # what `python -m bench.prepare` turns into the reference folder
    "cifar10": "python -m bench.prepare cifar10 cifar-10-python.tar.gz",
    "lsun-bedroom": "python -m bench.prepare lsun-bedroom bedroom_train_lmdb/",
    "lsun-church": "python -m bench.prepare lsun-church church_outdoor_train_lmdb/",
    "imagenet": "python -m bench.prepare imagenet ILSVRC2012_img_val/",
    "coco": "python -m bench.prepare coco val2014/ --captions annotations_trainval2014.zip",
}


def _no_reference_images(dataset: str, split: str, folder: Path) -> str:
    how = f"run `{PREPARE_HINTS[dataset]}`, or " if dataset in PREPARE_HINTS else ""
    return (f"no reference images for {dataset} (split {split!r}) in {folder}; {how}put the image files "
            f"(PNG/JPEG) there or set EDA_BENCH_DATA to a folder holding {dataset}/{split}/ "
            f"(bench.evaluate also takes --reference-dir)")


REFERENCE_CHUNK = 1000  # reference images decoded, resized and featurised at a time (50k LSUN images: 9.8 GB whole)


def _reference_chunks(dataset: str, split: str, res: int, reference_dir: str | os.PathLike | None):
    """uint8 RGB [<= REFERENCE_CHUNK, 3, res, res] chunks of the reference set, in sorted file order."""
    if dataset == "digits":
        from bench.metrics.data import load_digits_split

        yield to_uint8_rgb(load_digits_split(split, res)[0])
        return
    folder = _reference_folder(dataset, split, reference_dir)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
    if not files:
        raise BenchError(_no_reference_images(dataset, split, folder))
    from PIL import Image

    for s in range(0, len(files), REFERENCE_CHUNK):
        out = []
        for p in files[s:s + REFERENCE_CHUNK]:
            with Image.open(p) as im:
                im = im.convert("RGB")
                side = min(im.size)  # centre crop to a square, then bicubic to the generated resolution
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                if side != res:
                    im = im.resize((res, res), Image.BICUBIC)
                out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        yield torch.stack(out)


def _stats_key(dataset: str, split: str, extractor: str, res: int, reference_dir, mode: str = "clean") -> str:
    key = f"{dataset}_{split}_{extractor}_{res}" + ("" if mode == "clean" else f"_{mode}")
    if reference_dir is not None:  # a user folder: keep different folders apart
        key += "_" + hashlib.sha1(str(Path(reference_dir).resolve()).encode()).hexdigest()[:8]
    return key


STATS_DIM = 2048  # pool_3 features


def load_stats_file(path) -> dict[str, np.ndarray]:
    """Precomputed reference statistics: clean-fid's .npz (mu, sigma) or an ADM reference batch (mu, sigma, mu_s,
    sigma_s), as {mu, sigma[, spatial_mu, spatial_sigma]}; one error line for anything else."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"no reference statistics file at {p}; expected a .npz with mu and sigma (clean-fid) or "
                         "mu, sigma, mu_s, sigma_s (an ADM reference batch)")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files if k in ("mu", "sigma", "mu_s", "sigma_s")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BenchError(f"could not read reference statistics {p} ({type(e).__name__}); expected a .npz file "
                         "(clean-fid or ADM format)") from None
    mu, sigma = data.get("mu"), data.get("sigma")
    if mu is None or sigma is None or mu.shape != (STATS_DIM,) or sigma.shape != (STATS_DIM, STATS_DIM):
        got = {k: tuple(v.shape) for k, v in data.items()}
        raise BenchError(f"{p} holds no Inception pool_3 statistics: expected mu [{STATS_DIM}] and sigma "
                         f"[{STATS_DIM}, {STATS_DIM}] (clean-fid or ADM format), got {got or 'neither'}")
    out = {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}
    if "mu_s" in data and "sigma_s" in data:
        out["spatial_mu"], out["spatial_sigma"] = data["mu_s"].astype(np.float64), data["sigma_s"].astype(np.float64)
    return out


def stats_hash(stats: dict[str, np.ndarray]) -> str:
    """sha1 of the FID statistics (mu, sigma as float64), 12 hex digits: the same set gives the same hash."""
    h = hashlib.sha1()
    for k in ("mu", "sigma"):
        h.update(np.ascontiguousarray(stats[k], dtype=np.float64).tobytes())
    return h.hexdigest()[:12]


def describe_reference(dataset: str, split: str, stats: dict[str, np.ndarray], extractor: str, mode: str,
                       stats_file=None) -> str:
    """'digits/test, 360 images, stats 1a2b3c4d5e6f, extractor fid-helper, mode clean' (the row's `reference`)."""
    n = f"{len(stats['pool'])} images" if "pool" in stats else f"precomputed {Path(stats_file).name}" \
        if stats_file else "images unknown"
    net = "pytorch-fid" if mode == "legacy_pytorch" else extractor
    return f"{dataset}/{split}, {n}, stats {stats_hash(stats)}, extractor {net}, mode {mode}"


def reference_stats(dataset: str, split: str, res: int, extractor: str = "fid-helper", device="cpu",
                    reference_dir=None, batch_size: int = 64, progress: bool = True, mode: str = "clean",
                    stats_file=None) -> dict[str, np.ndarray]:
    """mu/sigma of pool and spatial features plus the pool feature matrix (KID, precision/recall), cached on disk;
    or the precomputed statistics in `stats_file`. A file lock makes a second process (the other Ray worker of a
    grid) wait for the first instead of computing the same statistics again (about 2 CPU-minutes for the digits
    test split)."""
    if stats_file is not None:
        return load_stats_file(stats_file)
    path = cache_dir() / "stats" / f"{_stats_key(dataset, split, extractor, res, reference_dir, mode)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _reference_stats(path, dataset, split, res, extractor, device, reference_dir, batch_size, progress,
                                    mode)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reference_stats(path: Path, dataset: str, split: str, res: int, extractor: str, device, reference_dir,
                     batch_size: int, progress: bool, mode: str = "clean") -> dict[str, np.ndarray]:
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # truncated/foreign: recompute
            warnings.warn(f"recomputing unreadable reference statistics {path} ({type(e).__name__})", stacklevel=2)
    from bench.metrics.inception import inception_features
    from bench.metrics.distances import Moments

    pools, spatial = [], Moments()  # chunk by chunk: the images are never all in memory, the pool features are
    for u8 in _reference_chunks(dataset, split, res, reference_dir):
        f = inception_features(u8, extractor, device, batch_size, progress, desc=f"reference {dataset}/{split}",
                               mode=mode)
        pools.append(f["pool"].astype(np.float32))
        if "spatial" in f:  # not in legacy_pytorch mode
            spatial.add(f["spatial"])
    pool = np.concatenate(pools).astype(np.float64)
    stats = {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False), "pool": pool.astype(np.float32)}
    if spatial.n:
        stats.update(zip(("spatial_mu", "spatial_sigma"), spatial.gaussian()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return stats


def default_split(dataset: str, split: str | None = None) -> str:
    """evaluate()'s reference split: the held-out "test" split for digits, "train" (the papers' FID reference) else."""
    return split or ("test" if dataset == "digits" else "train")


def reference_available(dataset: str, split: str | None = None, metrics=ALL_METRICS, reference_dir=None,
                        extractor: str = "fid-helper", res: int | None = None, mode: str = "clean",
                        stats_file=None) -> tuple[bool, str]:
    """(ok, the one-line error evaluate() would raise) for what `evaluate(images, dataset, metrics, ...)` needs,
    without reading an image or running a network: the Inception weights and the reference set (cached statistics
    or at least one image file) for Inception metrics, the digits classifier for digits metrics. Milliseconds: the
    harness asks before sampling, so a run without its reference data fails at once, not after the sampling."""
    metrics = check_requests(metrics)
    split = default_split(dataset, split)
    if any(m in metrics for m in INCEPTION_METRICS):
        from bench.metrics.inception import check_mode, pytorch_fid_weights, weights_path

        try:
            check_mode(mode)
            pytorch_fid_weights() if mode == "legacy_pytorch" else weights_path(extractor)
            if stats_file is not None:
                load_stats_file(stats_file)
        except BenchError as e:
            return False, str(e)
        if stats_file is None and dataset != "digits" and not _stats_cached(dataset, split, extractor, res,
                                                                            reference_dir, mode):
            folder = _reference_folder(dataset, split, reference_dir)
            files = (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else iter(())
            if next(files, None) is None:
                return False, _no_reference_images(dataset, split, folder)
    if dataset == "digits" and any(m in metrics for m in DIGITS_METRICS):
        from bench.metrics.classifier import load_classifier

        try:
            load_classifier()  # a few KB, memoised per process: also catches corrupt weights
        except BenchError as e:
            return False, str(e)
    return True, ""


def _stats_cached(dataset: str, split: str, extractor: str, res: int | None, reference_dir, mode: str = "clean") -> bool:
    """Reference statistics on disk for this set; any resolution when `res` is None (a latent model's image size is
    known only after decoding)."""
    stats = cache_dir() / "stats"
    if res is not None:
        return (stats / f"{_stats_key(dataset, split, extractor, res, reference_dir, mode)}.npz").is_file()
    # "@" never occurs in a dataset, split or extractor name (evaluate checks the dataset name)
    want = re.escape(_stats_key(dataset, split, extractor, "@", reference_dir, mode)).replace("@", r"\d+") + r"\.npz"
    return stats.is_dir() and any(re.fullmatch(want, p.name) for p in stats.iterdir())
