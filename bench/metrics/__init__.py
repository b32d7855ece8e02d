"""Metrics: the vocabulary (names.py), `evaluate` (score.py), feature distances, reference data and statistics, the
Inception network, the digits classifier and dataset, CLIP score, sample-grid images.

Nothing is imported here, so `bench.metrics.names` stays free of torch (the store and the reports read it); import
the submodule you need, e.g. `from bench.metrics.score import evaluate`.
"""
