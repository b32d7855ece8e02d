"""The metric vocabulary in one place: every metric's name, labels and direction, the names a grid may request, and
which of them the harness computes itself. Torch-free: the store, the reports and the planner read it.

Two kinds of names:
- store columns (`METRICS`): one float per metric in every result row, NaN when not computed;
- requests: what a grid's `metrics` list or `bench.evaluate --metrics` may name. `evaluate` takes `ALL_METRICS`
  ("pr" yields precision and recall, "digits_cov" yields digits_coverage and digits_confidence); the cell computes
  `HARNESS_METRICS` itself (distances to the FP samples, CLIP score, integer-kernel timing). eps_mse is always
  computed and never requested; so is mse_vs_fp (per-sample error against the FP samples from the same initial noise).
"""

from __future__ import annotations

from bench.errors import UsageError

# (store column, short label for tables / plots / the regression check, long label for bench.evaluate's printout and
# the model card or None to print the name, higher is better), in the store schema's column order
_TABLE = (
    ("fid", "FID", "FID (Inception)", False),
    ("sfid", "sFID", "sFID", False),
    ("is", "IS", "Inception Score", True),
    ("kid", "KID", "KID (Inception)", False),
    ("precision", "Prec", "precision (k=3)", True),
    ("recall", "Rec", "recall (k=3)", True),
    ("digits_fid", "dFID", "digits-FID (classifier)", False),
    ("digits_coverage", "dCov", "class coverage", True),
    ("digits_confidence", "dConf", "mean confidence", True),
    ("fid_vs_fp", "FID-FP", "FID vs FP", False),
    ("digits_fid_vs_fp", "dFID-FP", None, False),
    ("clip", "CLIP", None, True),
    ("eps_mse", "MSE(eps)", None, False),
    ("mse_vs_fp", "MSE-FP", None, False),
    ("int8_latency_ms", "int8 ms", None, False),
    ("int8_speedup", "int8 speed-up", None, True),
)
METRICS = tuple(name for name, *_ in _TABLE)
LABELS = {name: short for name, short, _, _ in _TABLE}
DESCRIPTIONS = {name: long for name, _, long, _ in _TABLE if long is not None}
HIGHER_IS_BETTER = {name for name, _, _, higher in _TABLE if higher}

# requests of bench.metrics.score.evaluate
ALL_METRICS = ("fid", "kid", "is", "sfid", "pr", "digits_fid", "digits_cov")
INCEPTION_METRICS = ("fid", "kid", "is", "sfid", "pr")
DIGITS_METRICS = ("digits_fid", "digits_cov")
# computed by the cell (bench.harness.cell) rather than by evaluate
VS_FP = ("fid_vs_fp", "digits_fid_vs_fp")  # distances to the FP samples of the same seed
INT8_METRICS = ("int8_latency_ms", "int8_speedup")  # integer-kernel timing (bench.harness.int8_cell)
HARNESS_METRICS = (*VS_FP, "clip", *INT8_METRICS)
GRID_METRICS = (*ALL_METRICS, *HARNESS_METRICS)  # what a grid's `metrics` may name


def lower_is_better(metric: str) -> bool:
    return metric not in HIGHER_IS_BETTER


def check_requests(metrics) -> tuple[str, ...]:
    """The requested evaluate() metric names as a tuple; UsageError naming the known ones on an unknown name."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; expected some of: {', '.join(ALL_METRICS)}")
    return metrics

# clean-fid's FID modes (bench.metrics.inception): which resize and which Inception port produce the features
FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
