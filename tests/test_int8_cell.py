"""Grid metrics int8_latency_ms / int8_speedup (bench/harness/int8_cell.py) and the report's quality-vs-speed-up plot."""

import math

import numpy as np
import pandas as pd
import torch

from bench.harness.grid import Cell
from bench.harness.int8_cell import int8_metrics
from bench.metrics.names import INT8_METRICS
from eda.policy import BitPolicy
from eda.trajectories import CalibSet
from eda.wrap import init_ranges, quantize_unet


def _cell(metrics):
    return Cell("g", "tiny", "rtn", "W8A8", 0, 8, None, tuple(metrics), {}, 8)


def _q(unet, bits="W8A8"):
    q = quantize_unet(unet, BitPolicy.from_bits(bits, w_init="minmax", a_init="minmax"))
    g = torch.Generator().manual_seed(0)
    init_ranges(q, CalibSet(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)), 4)
    return q


def test_int8_metrics_timed_only_when_asked(tiny_model):
    q = _q(tiny_model.unet)
    assert int8_metrics(tiny_model, q, _cell(["digits_fid"])) == {}
    assert int8_metrics(tiny_model, None, _cell(INT8_METRICS)) == {}
    out = int8_metrics(tiny_model, q, _cell(INT8_METRICS))
    assert set(out) == set(INT8_METRICS) and out["int8_latency_ms"] > 0 and out["int8_speedup"] > 0


def test_int8_metrics_nan_when_the_model_cannot_run(tiny_model):
    q = _q(tiny_model.unet, "W12A8")  # 12-bit weights: no int8 kernel; the cell keeps its other metrics
    out = int8_metrics(tiny_model, q, _cell(["int8_speedup"]))
    assert set(out) == set(INT8_METRICS) and all(math.isnan(v) for v in out.values())


def test_report_plots_quality_against_speedup(tmp_path):
    from bench.reporting.plots import _speed_figure

    rows = []
    for meth, bits, fid, sp in (("rtn", "W8A8", 30.0, 1.9), ("eda-dm", "W8A8", 25.0, 1.9), ("rtn", "W4A8", 60.0, 1.8)):
        rows += [dict(model="m", method=meth, bits=bits, metric="digits_fid", mean=fid, half=np.nan, n=1),
                 dict(model="m", method=meth, bits=bits, metric="int8_speedup", mean=sp, half=0.1, n=2)]
    made = _speed_figure(pd.DataFrame(rows), ["rtn", "eda-dm"], ["W8A8", "W4A8"], tmp_path / "p")
    assert [p.suffix for p in made] == [".png", ".svg"] and all(p.is_file() for p in made)
    assert _speed_figure(pd.DataFrame(rows[:1]), ["rtn"], ["W8A8"], tmp_path / "q") == []
