"""bench.check: a planted regression fails, the unchanged rerun passes, missing or failed cells fail."""

import pandas as pd
import pytest

from bench.check import main
from bench.reporting.regression import compare
from bench.harness.store import empty_row, read_runs, write_file, write_row


def row(method, bits, seed, fid, cov=0.9, status="ok", key=None, t="2026-01-01"):
    r = empty_row()
    r.update(grid="g", model="m", method=method, bits=bits, w_bits=int(bits[1]) if bits != "FP" else 32,
             a_bits=8, seed=seed, samples=16, status=status, error="" if status == "ok" else "boom",
             cell_key=key or f"{method}-{bits}-{seed}", run_id="r", digits_fid=fid, digits_coverage=cov,
             time=pd.Timestamp(t, tz="UTC"))
    return r


def rows(shift=0.0, cov_shift=0.0):
    # three seeds of noise: the CI term of the tolerance should absorb seed-to-seed scatter
    out = [row("fp", "FP", s, 1.0 + 0.01 * s) for s in range(3)]
    for meth, base in (("rtn", 5.0), ("eda-dm", 2.0)):
        for s, noise in enumerate((-0.2, 0.0, 0.2)):
            out.append(row(meth, "W4A8", s, base + noise + (shift if meth == "eda-dm" else 0),
                           cov=0.9 - (cov_shift if meth == "eda-dm" else 0)))
    return out


@pytest.fixture
def setup(tmp_path):
    for r in rows():
        write_row(tmp_path / "runs", r)
    ref = write_file(read_runs(tmp_path / "runs"), tmp_path / "ref.parquet")
    return tmp_path, ref


def rerun(tmp_path, new_rows):
    for r in new_rows:
        r["time"] = pd.Timestamp("2026-02-01", tz="UTC")  # newer: the latest row per cell wins
        write_row(tmp_path / "runs", r)


def test_unchanged_rerun_passes(setup, capsys):
    tmp_path, ref = setup
    rerun(tmp_path, rows(shift=0.05))  # within seed noise
    assert main(["--baseline", str(ref), "--out", str(tmp_path)]) == 0
    assert "check passed" in capsys.readouterr().out


def test_planted_regression_fails(setup, capsys):
    tmp_path, ref = setup
    rerun(tmp_path, rows(shift=1.5, cov_shift=0.2))  # eda-dm: digits-FID +75%, coverage -0.2
    with pytest.raises(SystemExit) as e:
        main(["--baseline", str(ref), "--out", str(tmp_path)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "check FAILED" in out and "eda-dm" in out and "digits_fid" in out and "digits_coverage" in out
    assert "rtn" not in out.split("FAILED", 1)[1].split("\n", 2)[2]  # rtn unchanged: not listed
    # a looser tolerance lets it pass
    assert main(["--baseline", str(ref), "--out", str(tmp_path), "--rel-tol", "1.0", "--abs-tol",
                 "digits_coverage=0.5"]) == 0


def test_missing_and_failed_cells_fail(setup):
    tmp_path, ref = setup
    ref_df = read_runs(tmp_path / "runs")
    cur = ref_df[~((ref_df["method"] == "rtn") & (ref_df["seed"] == 2))].copy()
    failed = (cur["method"] == "eda-dm") & (cur["seed"] == 0)
    cur.loc[failed, "status"], cur.loc[failed, "error"] = "failed", "boom"
    bad, _ = compare(ref_df, cur)
    reasons = set(bad["reason"])
    assert "cell missing from the run" in reasons and "boom" in reasons


def test_improvement_and_higher_is_better(setup):
    tmp_path, ref = setup
    ref_df = read_runs(tmp_path / "runs")
    cur = ref_df.copy()
    cur["digits_fid"] = cur["digits_fid"] * 0.5  # better
    cur["digits_coverage"] = 1.0  # better (higher is better)
    bad, compared = compare(ref_df, cur)
    assert bad.empty and compared == 3 * 2


def test_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--baseline", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)])
    assert e.value.code == 1 and "no results file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--baseline", "x", "--abs-tol", "bogus=1"])
    assert e.value.code == 2
