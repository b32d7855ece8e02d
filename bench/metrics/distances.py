"""Distances between feature sets: the Fréchet distance (FID, sFID, digits-FID), KID, improved precision/recall and
the Inception Score; `Moments`, the running mean and covariance a streamed feature set is summarised by. Pure
functions of feature arrays; the extractors that produce them are bench.metrics.inception and
bench.metrics.classifier.

The Fréchet distance is clean-fid's formula computed with symmetric eigendecompositions (10x faster than its sqrtm on
CPU; `frechet(..., backend="clean-fid")` calls clean-fid's own function and agrees to ~1e-9 relative); KID is
clean-fid's `kernel_distance`.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.errors import BenchError, UsageError

PR_K = 3  # Kynkäänniemi et al. 2019, k = 3 nearest neighbours
IS_SPLITS = 10  # Salimans et al. 2016 / the TF reference code


def _one_blas_thread():
    """NumPy's OpenBLAS spins its threads: on a loaded 2-core machine a 2-thread eigh or KID ran 10-20x slower in
    wall time than a single thread (measured while other jobs shared the CPU), so the linear algebra runs on one."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


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


class Moments:
    """Running mean and covariance of feature rows (float64). The rows are shifted by the first batch's mean before
    they are summed, so the second moment does not cancel catastrophically when the features sit far from zero.
    `gaussian()` matches `np.mean(f, 0), np.cov(f, rowvar=False)` of all rows to float64 rounding."""

    def __init__(self):
        self.n = 0
        self.shift = self.s1 = self.s2 = None

    def add(self, f) -> None:
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or not len(f):
            return
        if self.shift is None:
            self.shift = f.mean(0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((f.shape[1], f.shape[1]))
        d = f - self.shift
        self.s1 += d.sum(0)
        with _one_blas_thread():
            self.s2 += d.T @ d
        self.n += len(f)

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise UsageError(f"need at least 2 images to compare distributions, got {self.n}")
        m = self.s1 / self.n
        cov = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, np.atleast_2d((cov + cov.T) / 2)
