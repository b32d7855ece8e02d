"""The regression check on real smoke-grid rows (results/noise/rows.parquet, written by `python -m bench.noise`):
it stays green under float noise (another thread count, batch size, CPU kernels) and goes red on the regressions a
user cares about. The rows are the committed measurement the check's windows come from (bench/check.py), so these
tests fail when someone widens a window until it hides a regression, or narrows it below the measured noise."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.reporting.regression import compare
from bench.studies.noise import BASE, SEEDS

ROWS = Path(__file__).resolve().parent.parent / "results" / "noise" / "rows.parquet"


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    assert ROWS.is_file(), f"{ROWS} is committed with the check's windows; regenerate it with python -m bench.noise"
    return pd.read_parquet(ROWS)


@pytest.fixture(scope="module")
def base(rows) -> pd.DataFrame:
    b = rows[(rows["variant"] == BASE) & (rows["status"] == "ok")].copy()
    assert {"fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm"} <= set(b["method"]) and {"W8A8", "W4A8"} <= set(b["bits"])
    return b


def _problems(ref: pd.DataFrame, cur: pd.DataFrame) -> pd.DataFrame:
    problems, compared = compare(ref, cur)
    assert compared > 0
    return problems


def test_every_pair_of_float_outcomes_passes_both_ways(rows):
    """Same code, other float details: whichever outcome is the reference, the other passes (a false alarm every
    night is a dead check)."""
    outcomes = [v for v in rows["variant"].unique() if v != SEEDS]
    assert len(outcomes) >= 4, outcomes
    for ref in outcomes:
        for cur in outcomes:
            if ref != cur:
                problems = _problems(rows[rows["variant"] == ref], rows[rows["variant"] == cur])
                assert problems.empty, (ref, cur, problems.to_string())


def test_the_base_run_against_itself_passes(base):
    assert _problems(base, base).empty


def _worse(df: pd.DataFrame, metric: str, factor: float) -> pd.DataFrame:
    df = df.copy()
    q = df["method"] != "fp"
    df.loc[q, metric] = df.loc[q, metric] * factor
    return df


@pytest.mark.parametrize("metric, factor", [("eps_mse", 1.2), ("fid", 2.0)])
def test_eps_mse_up_20_percent_or_fid_doubled_fails_on_every_quantized_cell(base, metric, factor):
    problems = _problems(base, _worse(base, metric, factor))
    flagged = set(problems.loc[problems["metric"] == metric, "method"] + " " + problems.loc[problems["metric"] == metric, "bits"])
    quantized = set((base["method"] + " " + base["bits"])[base["method"] != "fp"])
    assert flagged == quantized, (metric, factor, sorted(quantized - flagged))


@pytest.mark.parametrize("metric, factor", [("digits_fid", 1.6), ("mse_vs_fp", 2.0)])
def test_the_noisier_metrics_catch_large_regressions_at_w4a8(base, metric, factor):
    """digits-FID and the per-sample error against FP move by 24% / 40% under float noise alone for EDA-DM W4A8,
    so their windows are wide; a regression of this size still fails on every W4A8 cell."""
    problems = _problems(base, _worse(base, metric, factor))
    flagged = set(problems.loc[problems["metric"] == metric, "method"][problems["bits"] == "W4A8"])
    assert flagged == set(base.loc[(base["method"] != "fp") & (base["bits"] == "W4A8"), "method"]), flagged


def test_losing_two_of_ten_classes_fails(base):
    cur = base.copy()
    q = cur["method"] == "eda-dm"
    cur.loc[q, "digits_coverage"] = cur.loc[q, "digits_coverage"] - 0.2
    problems = _problems(base, cur)
    assert (problems["metric"] == "digits_coverage").sum() == q.sum()


@pytest.mark.parametrize("bits", ["W4A8", "W8A8"])
def test_eda_dm_silently_running_round_to_nearest_fails(base, bits):
    """EDA-DM's rows replaced by round-to-nearest's at the same bit width (the method quietly lost calibration and
    reconstruction). Fails on the paired metrics, which move least under float noise."""
    metrics = ["eps_mse", "mse_vs_fp", "digits_fid_vs_fp", "digits_fid", "fid", "digits_coverage",
               "digits_confidence"]
    eda = base[(base["method"] == "eda-dm") & (base["bits"] == bits)]
    rtn = base[(base["method"] == "rtn") & (base["bits"] == bits)]
    assert len(eda) == len(rtn) == 1
    worse = [m for m in ("eps_mse",) if rtn[m].iloc[0] > eda[m].iloc[0]]
    if not worse:
        pytest.fail(f"round-to-nearest is not worse than EDA-DM at {bits} on eps_mse in the committed rows")
    cur = base.copy()
    idx = eda.index[0]
    for m in metrics:
        cur.loc[idx, m] = rtn[m].iloc[0]
    problems = _problems(base, cur)
    assert set(worse) & set(problems.loc[problems["method"] == "eda-dm", "metric"]), problems.to_string()


def test_a_missing_or_failed_cell_fails(base):
    gone = base[base["method"] != "qdiffusion"]
    assert (_problems(base, gone)["reason"] == "cell missing from the run").any()
    failed = base.copy()
    failed.loc[failed["method"] == "ptq4dm", "status"] = "failed"
    failed.loc[failed["method"] == "ptq4dm", "error"] = "boom"
    assert (_problems(base, failed)["current"] == "failed").any()


def test_the_windows_leave_a_margin_over_the_measured_float_noise(rows):
    """Every float-noise change from base is at most 60% of its window (about 2x margin, README)."""
    from bench.reporting.regression import window
    from bench.studies.noise import float_deltas

    d = float_deltas(rows)
    assert len(d)
    w = np.array([window(m, b) for m, b in zip(d["metric"], d["base"])])
    frac = d["delta"].abs().to_numpy() / w
    assert np.all(frac <= 0.6), d.assign(frac=frac).sort_values("frac").tail(5).to_string()
