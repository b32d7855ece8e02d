"""The metric vocabulary in one place: the names `evaluate` takes as requests.

    fid kid is sfid pr digits_fid digits_cov    requests; "pr" yields precision and recall, "digits_cov" yields
                                                digits_coverage and digits_confidence
"""

from __future__ import annotations

from bench.errors import UsageError

ALL_METRICS = ("fid", "kid", "is", "sfid", "pr", "digits_fid", "digits_cov")
INCEPTION_METRICS = ("fid", "kid", "is", "sfid", "pr")
DIGITS_METRICS = ("digits_fid", "digits_cov")


def check_requests(metrics) -> tuple[str, ...]:
    """The requested metric names as a tuple; UsageError naming the known ones on an unknown name."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; expected some of: {', '.join(ALL_METRICS)}")
    return metrics


LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "kid": "KID", "precision": "Prec", "recall": "Rec",
          "digits_fid": "dFID", "digits_coverage": "dCov", "digits_confidence": "dConf", "fid_vs_fp": "FID-FP",
          "digits_fid_vs_fp": "dFID-FP",
          "clip": "CLIP", "eps_mse": "MSE(eps)", "int8_latency_ms": "int8 ms", "int8_speedup": "int8 speed-up"}
HIGHER_IS_BETTER = {"is", "precision", "recall", "digits_coverage", "digits_confidence", "clip", "int8_speedup"}


def lower_is_better(metric: str) -> bool:
    return metric not in HIGHER_IS_BETTER
# long labels: bench.evaluate's printout and the model card (names not listed print as themselves)
DESCRIPTIONS = {"fid": "FID (Inception)", "kid": "KID (Inception)", "is": "Inception Score", "sfid": "sFID",
                "precision": "precision (k=3)", "recall": "recall (k=3)", "digits_fid": "digits-FID (classifier)",
                "digits_coverage": "class coverage", "digits_confidence": "mean confidence", "fid_vs_fp": "FID vs FP"}
