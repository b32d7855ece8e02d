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


def test_every_float_variant_passes_the_committed_windows(rows, base):
    """Same code, other float details: the check must stay green (a false alarm every night is a dead check)."""
    variants = [v for v in rows["variant"].unique() if v not in (BASE, SEEDS)]
    assert len(variants) >= 3, variants
    for v in variants:
        cur = rows[rows["variant"] == v]
        problems = _problems(base, cur)
        assert problems.empty, (v, problems.to_string())


def test_the_base_run_against_itself_passes(base):
    assert _problems(base, base).empty


def _worse(df: pd.DataFrame, metric: str, factor: float) -> pd.DataFrame:
    df = df.copy()
    q = df["method"] != "fp"
    df.loc[q, metric] = df.loc[q, metric] * factor
    return df


@pytest.mark.parametrize("metric", ["digits_fid", "eps_mse", "mse_vs_fp", "fid"])
def test_every_quantized_cell_a_quarter_worse_fails(base, metric):
    problems = _problems(base, _worse(base, metric, 1.24))
    flagged = set(problems.loc[problems["metric"] == metric, "method"])
    assert flagged, f"24% worse {metric} on every quantized cell passed the check"


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
    metrics = ["eps_mse", "mse_vs_fp", "digits_fid_vs_fp", "digits_fid", "fid"]
    eda = base[(base["method"] == "eda-dm") & (base["bits"] == bits)]
    rtn = base[(base["method"] == "rtn") & (base["bits"] == bits)]
    assert len(eda) == len(rtn) == 1
    worse = [m for m in ("eps_mse", "mse_vs_fp") if rtn[m].iloc[0] > eda[m].iloc[0]]
    if not worse:
        pytest.fail(f"round-to-nearest is not worse than EDA-DM at {bits} on the paired errors in the committed rows")
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


def test_the_windows_sit_above_the_measured_float_noise_with_margin(rows, base):
    """No window is narrower than the largest float-noise change seen on the committed rows; print the margins."""
    from bench.reporting.regression import window
    from bench.studies.noise import float_deltas

    d = float_deltas(rows)
    assert len(d)
    w = np.array([window(m, b) for m, b in zip(d["metric"], d["base"])])
    frac = d["delta"].abs().to_numpy() / w
    assert np.all(frac <= 1.0), d.assign(frac=frac).sort_values("frac").tail(5).to_string()
