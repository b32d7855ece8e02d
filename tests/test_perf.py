"""bench.perf (bench/studies/perf_*.py): the benchmark's building blocks count what they claim to (the timings
themselves are not tested)."""

import pandas as pd
import pytest
import torch

from bench import perf
from bench.harness.timing import alternate
from bench.studies import perf_figures, perf_page

torch.set_num_threads(1)


def _forward_counter(module):
    calls = []
    h = module.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    return calls, h


def test_official_scheme_runs_three_unit_forwards_and_ours_one(tiny_unet):
    calib = perf_figures._calib(tiny_unet, 4)
    q = perf_figures._quantized(tiny_unet, "W4A8", calib)
    units = perf_figures._units_by_kind(q)
    assert {"resnet", "attention", "layer"} <= set(units)
    ub = perf_figures._UnitBench(q, tiny_unet, units["resnet"], calib, 4)
    assert ub.inner  # FBR inner layers are tapped
    q_calls, hq = _forward_counter(ub.unit.module)
    fp_calls, hf = _forward_counter(ub.fp_unit)
    try:
        alpha = next(p for p in ub.opts[0].param_groups[0]["params"]).detach().clone()
        ub.cached_iteration()
        assert (len(q_calls), len(fp_calls)) == (1, 0)
        ub.official_iteration()
        assert (len(q_calls), len(fp_calls)) == (3, 1)
        assert fp_calls == [False] and all(q_calls)  # FP targets without autograd, quantized passes with it
        assert not torch.equal(alpha, ub.opts[0].param_groups[0]["params"][0].detach())  # both schemes train
    finally:
        hq.remove()
        hf.remove()


def test_alternate_interleaves_and_row_ratios():
    order = []
    t = alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=2, warmup=1)
    assert order == ["a", "b"] * 3 and set(t) == {"a", "b"}
    up = perf_figures.row("x", "c", "base", 4.0, "ours", 2.0, "speedup", 2.0)
    assert up["ratio"] == 2.0 and up["target_met"] is True
    over = perf_figures.row("x", "c", "base", 1.0, "ours", 1.5, "overhead", 1.3)
    assert over["ratio"] == 1.5 and over["target_met"] is False
    assert perf_figures.row("x", "c", "b", 1.0, "o", 1.0, "speedup")["target_met"] is None


def test_fast_path_switch_restores_flags():
    import eda.quantizer
    import eda.wrap

    with perf_figures.fast_path(False):
        assert not eda.quantizer.FUSED_INFERENCE and not eda.wrap.CACHE_QUANT_WEIGHTS
    assert eda.quantizer.FUSED_INFERENCE and eda.wrap.CACHE_QUANT_WEIGHTS


def test_page_and_parquet(tmp_path):
    rows = [perf_figures.row("sampling", "digits W8A8", "FP", 1.0, "fake-quant", 1.2, "overhead", 1.3),
            perf_figures.row("ray", "4 cells, 2 worker(s)", "1 worker", 10.0, "2 workers", 6.0, "speedup", None,
                     workers=2, efficiency=10 / 6 / 2)]
    env = {"command": "python -m bench.perf", "device": "CPU", "cpus": 2, "threads": 1, "versions": {"torch": "x"},
           "git_commit": "abc", "time": "now", "load_average": 0.5}
    perf_page.write(rows, env, tmp_path / "perf" / "perf.parquet", tmp_path / "perf.md")
    df = pd.read_parquet(tmp_path / "perf" / "perf.parquet")
    assert list(df.figure) == ["sampling", "ray"] and df.ratio.tolist() == pytest.approx([1.2, 10 / 6])
    page = (tmp_path / "perf.md").read_text()
    assert "1.20 x of baseline | <= 1.3x | yes" in page and "2 workers 0.83" in page


def test_unknown_figure_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(["--only", "warp-drive"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown figure" in err[0] and "recon" in err[0]


def test_a_later_only_run_keeps_the_other_figures(tmp_path):
    env = {"command": "python -m bench.perf", "device": "CPU", "cpus": 2, "threads": 1, "versions": {},
           "git_commit": "abc", "time": "t1", "load_average": 1.0}
    pq, page = tmp_path / "perf" / "perf.parquet", tmp_path / "perf.md"
    perf_page.write([perf_figures.row("sampling", "a", "FP", 1.0, "fq", 1.2, "overhead", 1.3)], env, pq, page)
    perf_page.write([perf_figures.row("ray", "b", "1 worker", 2.0, "2 workers", 1.0, "speedup", None, workers=2,
                                      efficiency=1.0)],
               {**env, "command": "python -m bench.perf --only ray", "time": "t2"}, pq, page)
    perf_page.write([perf_figures.row("sampling", "c", "FP", 1.0, "fq", 1.1, "overhead", 1.3)], {**env, "time": "t3"},
                    pq, page)
    df = pd.read_parquet(pq)
    assert sorted(zip(df.figure, df.case, df.time)) == [("ray", "b", "t2"), ("sampling", "c", "t3")]
    text = page.read_text()
    assert "Measured t2 by `python -m bench.perf --only ray`" in text and "Measured t3" in text


def test_budget_figure_times_every_unit_on_both_training_paths_and_restores_the_flag(tiny_unet, monkeypatch):
    """Figure (g): one timing per reconstruction unit for each path, the projection sums them over 5000 iterations,
    the profile names real ops, and FUSED_TRAINING is back to its value afterwards."""
    import types

    import bench.models.registry
    import eda.quantizer
    from eda.units import reconstruction_units

    monkeypatch.setattr(bench.models.registry, "load_model", lambda name: types.SimpleNamespace(unet=tiny_unet))
    seen = []
    real = perf_figures._UnitBench.cached_iteration
    monkeypatch.setattr(perf_figures._UnitBench, "cached_iteration",
                        lambda self: (seen.append(eda.quantizer.FUSED_TRAINING), real(self))[1])
    rows = perf_figures.fig_budget(types.SimpleNamespace(quick=True))
    assert eda.quantizer.FUSED_TRAINING is True and {True, False} <= set(seen)
    speed, target = rows
    d = __import__("json").loads(speed["details"])
    n_units = len(reconstruction_units(perf_figures._quantized(tiny_unet, "W4A8", perf_figures._calib(tiny_unet, 2))))
    assert d["units"] == n_units == len(d["per_unit_iteration_s"])
    fused = 5000 * sum(t["fused"] for t in d["per_unit_iteration_s"].values()) + d["fixed_s"]
    assert speed["ours_seconds"] == pytest.approx(fused) and target["ours_seconds"] == pytest.approx(fused)
    assert target["baseline_seconds"] == 1800 and target["ratio_kind"] == "overhead"
    assert d["slowest_unit_top_ops"] and all(0 < o["share"] <= 1 for o in d["slowest_unit_top_ops"])


def test_memory_figure_cell_runs_and_the_page_reports_ratios_and_slope(tmp_path, monkeypatch):
    """The measuring process's cell (shrunk to 32 x 32 here) saves every sample and reports its peak RSS; the
    figure turns measurements into ratios to the smallest count, a slope and a verdict on the page."""
    import torch

    from bench.studies import perf_memory

    monkeypatch.setattr(perf_memory, "SIDE", 32)
    monkeypatch.setattr(perf_memory, "BATCH", 8)
    mkldnn = torch.backends.mkldnn.enabled
    try:
        got = perf_memory.measure_one(perf_memory.build_model(tmp_path / "m"), 20, tmp_path / "w")
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    # ru_maxrss is the process's lifetime peak: in a test process an earlier test may have set it
    assert got["status"] == "ok" and got["peak_rss_mb"] >= got["rss_after_load_mb"] > 0
    assert got["saved_mb"] * 2 ** 20 > 20 * 32 * 32 * 3  # every image, as uint8
    fake = {1000: 900.0, 5000: 905.0, 20000: 1200.0}
    monkeypatch.setattr(perf_memory, "measure", lambda n, folder: {
        "n": n, "peak_rss_mb": fake[n], "seconds": 1.0, "saved_mb": 1.0, "whole_tensor_mb": 1.0, "status": "ok"})
    monkeypatch.setattr(perf_memory, "build_model", lambda folder: folder)
    rows = perf_memory.fig_memory(type("A", (), {"quick": False})())
    assert [r["target_met"] for r in rows] == [True, False] and rows[1]["ratio"] == pytest.approx(1200 / 900)
    env = {"command": "python -m bench.perf --only memory", "device": "CPU", "cpus": 2, "threads": 1,
           "versions": {}, "git_commit": "abc", "time": "t", "load_average": 1.0}
    perf_page.write(rows, env, tmp_path / "perf" / "perf.parquet", tmp_path / "perf.md")
    page = (tmp_path / "perf.md").read_text()
    assert "| 20000 | 1200 | 1.33x |" in page and "**not met**" in page
    assert f"Slope {300 / 19000 * 1024:.2f} KB per sample" in page
    # the paper architectures' 50k-sample cells: measured peak + slope x the rest + their float32 weights
    import json

    from pathlib import Path

    arch = json.loads((Path(__file__).parents[1] / "results" / "architectures" / "sd-v1-4.json")
                      .read_text())["params"]
    weights = 4 * (2 * arch["unet"] + sum(v for k, v in arch.items() if k != "unet")) / 2 ** 20
    assert f"| sd-v1-4 | 860M | 207M | {weights:.0f} | {1200 + 300 / 19000 * 30000 + weights:.0f} |" in page
    # --render-only rewrites the page from the stored rows alone
    from bench.perf import main as perf_main

    (tmp_path / "perf.md").unlink()
    assert perf_main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "perf.md").read_text().count("| 20000 | 1200 | 1.33x |") == 1


def test_streaming_cell_peak_memory_does_not_grow_with_the_sample_count(tmp_path, monkeypatch):
    """One RTN cell saving its samples (3 x 128 x 128, batch 50), each count in a fresh process: 1800 more samples
    may not raise the peak RSS by more than 110 MB. Measured on 2 cores: +40-50 MB with the heap released between
    batches (bench/harness/heap.py); +250 MB when glibc keeps freed batch buffers resident; holding the float32
    images, as cells did before streaming, would add 350 MB."""
    from bench.studies import perf_memory

    monkeypatch.setattr(perf_memory, "SIDE", 128)
    folder = perf_memory.build_model(tmp_path / "m")
    small, large = perf_memory.measure(200, folder), perf_memory.measure(2000, folder)
    assert small["status"] == large["status"] == "ok"
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    assert growth < 110, f"peak RSS grew {growth:.0f} MB from 200 to 2000 samples ({small} -> {large})"


def test_release_freed_runs_where_glibc_is():
    import platform

    from bench.harness.heap import release_freed

    assert release_freed() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
