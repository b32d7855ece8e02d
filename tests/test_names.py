"""The metric vocabulary (bench/metrics/names.py): one list of names, and every other spelling of a metric refers to
it."""

from bench.metrics import names


def test_every_metric_has_a_label_and_the_directions_name_metrics():
    assert set(names.LABELS) == set(names.METRICS) and len(set(names.METRICS)) == len(names.METRICS)
    assert names.HIGHER_IS_BETTER <= set(names.METRICS) and set(names.DESCRIPTIONS) <= set(names.METRICS)
    assert names.lower_is_better("fid") and not names.lower_is_better("is")


def test_harness_metrics_are_store_columns_and_requests_are_not_duplicated():
    assert set(names.HARNESS_METRICS) <= set(names.METRICS)
    assert not set(names.ALL_METRICS) & set(names.HARNESS_METRICS)
    assert set(names.GRID_METRICS) == set(names.ALL_METRICS) | set(names.HARNESS_METRICS)


def test_the_store_schema_and_the_regression_tolerances_use_the_vocabulary():
    from bench.harness.store import FILE_SCHEMA
    from bench.reporting.regression import BOUNDED, TOLERANCES

    assert [f.name for f in FILE_SCHEMA if f.name in names.METRICS] == list(names.METRICS)
    assert set(TOLERANCES) <= set(names.METRICS) and BOUNDED <= set(names.METRICS)
