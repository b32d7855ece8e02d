"""Sample-quality metrics fed one batch at a time, so scoring 50,000 samples holds one batch of images.

    scorer = SampleScorer("digits", metrics=("fid", "digits_fid"))   # loads the reference statistics first
    for images in batches:                                           # [B, C, H, W] in [-1, 1]
        scorer.add(images)
    scores = scorer.result(fp_stats)                                 # fp_stats: FeatureMoments(...).stats()

What is kept per sample set, whatever its size:
- running first and second moments of the Inception pool features (FID, FID vs FP), of its spatial features (sFID)
  and of the digits classifier's features (digits-FID): a d x d float64 matrix each (32 MB for d = 2048);
- the digits classifier's predicted classes (a set of at most 10) and the sum of its confidences.
What grows with the sample count, and only when asked for: the Inception pool features for KID and precision/recall
(8 KB per sample in float32: 400 MB at 50k; both need every feature vector) and the logits for the Inception Score
(4 KB per sample).

`bench.metrics.score.evaluate` is this class fed from one tensor; a harness cell (bench.harness.cell) feeds it as it
samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.errors import UsageError
from bench.metrics.data import to_uint8_rgb
from bench.metrics.distances import Moments, frechet, inception_score, kid, precision_recall
from bench.metrics.names import ALL_METRICS, DIGITS_METRICS, INCEPTION_METRICS, check_requests


def _inception(u8: torch.Tensor, extractor: str, device, batch_size: int, mode: str) -> dict[str, np.ndarray]:
    from bench.metrics.inception import inception_features

    return inception_features(u8, extractor, device, batch_size, mode=mode)


class FeatureMoments:
    """The statistics a quantized cell compares its samples with (FID vs FP, digits-FID vs FP): Inception pool
    moments and, for digits, the classifier's. Small and picklable through `stats()`, so a harness caches them once
    per FP sample set instead of extracting the FP features again in every cell."""

    def __init__(self, inception: bool = True, digits: bool = False, extractor: str = "fid-helper", device="cpu",
                 batch_size: int = 64, mode: str = "clean"):
        self.pool = Moments() if inception else None
        self.digits = Moments() if digits else None
        self.extractor, self.device, self.batch_size, self.mode = extractor, device, batch_size, mode

    def add(self, images: torch.Tensor) -> None:
        images = images.detach().cpu()
        if self.pool is not None:
            self.pool.add(_inception(to_uint8_rgb(images), self.extractor, self.device, self.batch_size,
                                     self.mode)["pool"])
        if self.digits is not None:
            from bench.metrics import classifier

            self.digits.add(classifier.features(images))

    def stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        if self.pool is not None:
            out["pool"] = self.pool.gaussian()
        if self.digits is not None:
            out["digits"] = self.digits.gaussian()
        return out


class SampleScorer:
    """The metrics of `bench.metrics.score.evaluate`, accumulated batch by batch (see the module docstring).

    The reference statistics are loaded (or computed and cached) when the scorer is made if `resolution` (the
    images' side, which the reference images are resized to) is given, so a missing dataset fails before any
    sampling; else with the first batch. `vs_fp=True` keeps the Inception pool moments even when no Inception
    metric is asked for (FID vs FP), `digits_vs_fp=True` the digits classifier's (digits-FID vs FP)."""

    def __init__(self, dataset: str, metrics=ALL_METRICS, device="cpu", split: str | None = None,
                 reference_dir=None, extractor: str = "fid-helper", batch_size: int = 64, seed: int = 0,
                 progress: bool = False, mode: str = "clean", stats_file=None, described: dict | None = None,
                 vs_fp: bool = False, digits_vs_fp: bool = False, resolution: int | None = None):
        import re

        from bench.metrics.inception import check_mode
        from bench.metrics.reference import default_split, describe_reference, reference_stats

        check_mode(mode)
        self.metrics = check_requests(metrics)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset or ""):
            raise UsageError(f"bad dataset name {dataset!r}; expected e.g. digits, cifar10, lsun-church, imagenet, "
                             "coco")
        self.dataset, self.split = dataset, default_split(dataset, split)
        self.extractor, self.device, self.batch_size, self.mode, self.seed = extractor, device, batch_size, mode, seed
        m = self.metrics
        self.ref = None
        self.keep_pool = False  # set when the reference has per-image features (KID, precision/recall need them)
        self.wants_ref = any(k in m for k in INCEPTION_METRICS)

        def load(res: int) -> None:
            self.ref = reference_stats(dataset, self.split, res, extractor, device, reference_dir, batch_size,
                                       progress, mode=mode, stats_file=stats_file)
            if described is not None:
                described["reference"] = describe_reference(dataset, self.split, self.ref, extractor, mode,
                                                            stats_file)
            self.keep_pool = ("kid" in m or "pr" in m) and "pool" in self.ref

        self._load_reference = load
        if self.wants_ref and resolution is not None:  # reference first: a missing dataset fails before any work
            load(resolution)
        self.inception = self.wants_ref or vs_fp
        self.pool = Moments() if self.inception else None
        self.spatial = Moments() if self.wants_ref and "sfid" in m else None
        self.keep_logits = self.wants_ref and "is" in m
        self.pools: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []
        self.has_logits = True
        self.digits = dataset == "digits" and any(k in m for k in DIGITS_METRICS)
        self.digit_moments = Moments() if dataset == "digits" and ("digits_fid" in m or digits_vs_fp) else None
        self.classes: set[int] = set()
        self.confidence = 0.0
        self.n = 0

    def add(self, images: torch.Tensor) -> None:
        """One batch of samples, [B, 1|3, H, W] in [-1, 1]."""
        x = images.detach().cpu()
        u8 = to_uint8_rgb(x)  # UsageError on a wrong shape
        self.n += len(u8)
        if self.wants_ref and self.ref is None:
            self._load_reference(u8.shape[-1])
        if self.inception:
            feats = _inception(u8, self.extractor, self.device, self.batch_size, self.mode)
            self.pool.add(feats["pool"])
            if self.spatial is not None and "spatial" in feats:
                self.spatial.add(feats["spatial"])
            if self.keep_pool:
                self.pools.append(feats["pool"].astype(np.float32))
            if self.keep_logits:
                if "logits" in feats:
                    self.logits.append(feats["logits"].astype(np.float32))
                else:
                    self.has_logits = False
        if self.digits or self.digit_moments is not None:
            from bench.metrics import classifier

            if self.digit_moments is not None:
                self.digit_moments.add(classifier.features(x))
            if self.digits and "digits_cov" in self.metrics:
                labels, probs = classifier.predict(x)
                self.classes.update(labels.tolist())
                self.confidence += float(probs.max(1).values.double().sum())

    def result(self, fp_stats: dict | None = None) -> dict[str, float]:
        """The scores; `fp_stats` (FeatureMoments.stats() of the FP samples) adds fid_vs_fp and, with digits-FID,
        digits_fid_vs_fp. NaN where an input is missing, as `evaluate` documents."""
        if self.n < 2:
            raise UsageError(f"need at least 2 images to compare distributions, got {self.n}")
        m, out, ref = self.metrics, {}, self.ref
        if ref is not None:
            mu, sigma = self.pool.gaussian()
            if "fid" in m:
                out["fid"] = frechet(mu, sigma, ref["mu"], ref["sigma"])
            pools = np.concatenate(self.pools).astype(np.float64) if self.keep_pool else None
            if "kid" in m:
                out["kid"] = kid(pools, ref["pool"], seed=self.seed) if pools is not None else math.nan
            if "is" in m:
                out["is"] = inception_score(np.concatenate(self.logits).astype(np.float64)) \
                    if self.has_logits and self.logits else math.nan
            if "sfid" in m:
                out["sfid"] = frechet(*self.spatial.gaussian(), ref["spatial_mu"], ref["spatial_sigma"]) \
                    if self.spatial is not None and self.spatial.n and "spatial_mu" in ref else math.nan
            if "pr" in m:
                out["precision"], out["recall"] = precision_recall(ref["pool"], pools) if pools is not None \
                    else (math.nan, math.nan)
        if fp_stats and "pool" in fp_stats and self.pool is not None:
            out["fid_vs_fp"] = frechet(*self.pool.gaussian(), *fp_stats["pool"])
        if fp_stats and "digits" in fp_stats and self.digit_moments is not None:
            out["digits_fid_vs_fp"] = frechet(*self.digit_moments.gaussian(), *fp_stats["digits"])
        if any(k in m for k in DIGITS_METRICS):
            if not self.digits:  # the classifier only knows digits
                if "digits_fid" in m:
                    out["digits_fid"] = math.nan
                if "digits_cov" in m:
                    out["digits_coverage"] = out["digits_confidence"] = math.nan
            else:
                from bench.metrics import classifier
                from bench.metrics.classifier import NUM_CLASSES

                if "digits_fid" in m:
                    out["digits_fid"] = frechet(*self.digit_moments.gaussian(), *classifier.reference_stats(self.split))
                if "digits_cov" in m:
                    out["digits_coverage"] = len(self.classes) / NUM_CLASSES
                    out["digits_confidence"] = self.confidence / self.n
        return out
