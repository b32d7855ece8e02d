"""bench.check on synthetic rows: a planted regression fails, the unchanged rerun passes, missing or failed cells
fail, and each part of the rule (absolute windows for bounded metrics, zero references, pairing by seed, the seed-CI
term, latest rerun) does what bench/check.py says. tests/test_check_power.py runs it on the real smoke rows."""

import pandas as pd
import pytest

from bench.check import TOLERANCES, compare, main, tolerances_for, window
from bench.errors import UsageError
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
        main(["--baseline", "x", "--abs-tol", "bogus=1"])
    assert e.value.code == 2


def exit_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")  # one line, no traceback
    return e.value.code, err


def test_a_check_that_cannot_run_exits_3_not_1(setup, capsys):
    """A nightly job must tell "the code got worse" (1) from "the check had nothing to read" (3): a missing,
    corrupt or empty baseline, and an --out with no run of the grid or a damaged row file in it."""
    tmp_path, ref = setup
    code, err = exit_of(["--baseline", str(tmp_path / "nope.parquet"), "--out", str(tmp_path)], capsys)
    assert code == 3 and "no results file" in err
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    code, err = exit_of(["--baseline", str(junk), "--out", str(tmp_path)], capsys)
    assert code == 3 and "not a readable Parquet results file" in err
    empty = write_file(read_runs(tmp_path / "runs").iloc[:0], tmp_path / "empty.parquet")
    code, err = exit_of(["--baseline", str(empty), "--out", str(tmp_path)], capsys)
    assert code == 3 and "holds no cells" in err
    code, err = exit_of(["--baseline", str(ref), "--out", str(tmp_path / "elsewhere")], capsys)
    assert code == 3 and "no run of grid g" in err
    damaged = next((tmp_path / "runs").rglob("*.parquet"))
    damaged.write_bytes(damaged.read_bytes()[:40])  # a row file cut short outside the store's atomic writes
    code, err = exit_of(["--baseline", str(ref), "--out", str(tmp_path)], capsys)
    assert code == 3 and "not readable Parquet" in err and "delete that file" in err


def test_bounded_metric_gets_no_relative_window(setup):
    """Coverage is in [0, 1]: one lost class in ten is 0.1 whatever the reference, and a relative window would let a
    cell at coverage 1.0 lose 2 classes under a 25% rel_tol (the old rule)."""
    tmp_path, ref = setup
    ref_df = read_runs(tmp_path / "runs")
    cur = ref_df.copy()
    cur["digits_coverage"] -= 0.2
    bad, _ = compare(ref_df, cur, rel_tol=0.5)  # a single number applies to unbounded metrics only
    assert set(bad["metric"]) == {"digits_coverage"}
    with pytest.raises(UsageError, match="bounded"):
        compare(ref_df, cur, rel_tol={"digits_coverage": 0.5})


def test_zero_reference_uses_the_absolute_window():
    """A metric that is 0 for the FP cell by definition (eps_mse, *_vs_fp) has no relative window there: any change
    beyond the absolute floor fails, and an unchanged 0 passes."""
    ref = pd.DataFrame([row("fp", "FP", 0, 1.0)])
    ref["eps_mse"] = 0.0
    cur = ref.copy()
    assert compare(ref, cur)[0].empty
    cur["eps_mse"] = 10 * window("eps_mse", 0.0)
    bad, _ = compare(ref, cur)
    assert list(bad["metric"]) == ["eps_mse"]


def test_paired_by_seed_uniform_relative_shift_fails_despite_seed_scatter():
    """Seeds scatter widely (digits-FID 2, 20, 200) but every seed got 30% worse: per-seed changes in units of their
    windows do not scatter, so the CI term cannot hide it (a CI of absolute differences would)."""
    base = [row("eda-dm", "W4A8", s, fid) for s, fid in enumerate((2.0, 20.0, 200.0))]
    worse = [row("eda-dm", "W4A8", s, 1.3 * fid) for s, fid in enumerate((2.0, 20.0, 200.0))]
    bad, _ = compare(pd.DataFrame(base), pd.DataFrame(worse), rel_tol=0.1, abs_tol={"digits_fid": 0.0})
    assert list(bad["metric"]) == ["digits_fid"]


def test_seed_ci_absorbs_changes_that_flip_sign_across_seeds():
    """With >= 2 seeds, a change that is worse on one seed and as much better on others is seed noise: the k x CI
    term of the rule lets it pass, and k = 0 (no CI term) fails it."""
    ref = pd.DataFrame([row("rtn", "W4A8", s, 10.0) for s in range(3)])
    cur = pd.DataFrame([row("rtn", "W4A8", s, v) for s, v in enumerate((16.0, 6.0, 12.0))])
    tol = {"digits_fid": (1.0, 0.0)}
    assert compare(ref, cur, tolerances=tol)[0].empty  # mean +1.33 windows, CI 12.4 windows
    assert list(compare(ref, cur, tolerances=tol, k=0.0)[0]["metric"]) == ["digits_fid"]


def test_latest_rerun_per_cell_is_compared(setup):
    """A results directory may hold a cell twice under different keys (rerun at another batch size): the check
    compares the newest row, not the mean of both."""
    tmp_path, ref = setup
    ref_df = read_runs(tmp_path / "runs")
    old = ref_df.copy()
    old["digits_fid"] *= 3  # an old, bad run of the same cells under other keys
    old["cell_key"] = old["cell_key"] + "-b32"
    old["time"] = pd.Timestamp("2025-01-01", tz="UTC")
    assert compare(ref_df, pd.concat([old, ref_df]))[0].empty


def test_markdown_written_on_pass_and_fail(setup, capsys):
    tmp_path, ref = setup
    md = tmp_path / "check.md"
    assert main(["--baseline", str(ref), "--out", str(tmp_path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "check passed" in text and "| model |" in text and "digits_fid" in text  # every comparison listed
    rerun(tmp_path, rows(shift=1.5))
    with pytest.raises(SystemExit):
        main(["--baseline", str(ref), "--out", str(tmp_path), "--markdown", str(md)])
    text = md.read_text()
    assert "check FAILED" in text and "## Problems" in text and "eda-dm" in text.split("## Problems")[1]


def test_grid_check_table_and_cli_precedence(tmp_path):
    """Defaults < the grid file's [check] table < the command line."""
    g = tmp_path / "g.toml"
    g.write_text('name = "g"\n[defaults]\nmethods = ["fp"]\nbits = ["W8A8"]\nseeds = [0]\nsamples = 4\n'
                 '[check]\nrel_tol = 0.5\nk = 2.0\nabs_tol = { digits_coverage = 0.3 }\n[[model]]\nname = "m"\n')
    k, tol = tolerances_for(str(g))
    assert k == 2.0 and tol["digits_fid"][1] == 0.5 and tol["digits_coverage"] == (0.3, 0.0)
    k, tol = tolerances_for(str(g), rel_tol={"digits_fid": 0.01}, k=1.0, abs_tol={"digits_coverage": 0.1})
    assert k == 1.0 and tol["digits_fid"][1] == 0.01 and tol["eps_mse"][1] == 0.5 and tol["digits_coverage"][0] == 0.1
    assert tolerances_for(None)[1] == TOLERANCES


def test_nightly_prints_the_check_table_when_a_cell_failed():
    """The grid step exits 1 when a cell failed; the check must still run then (its table is what a person reads),
    write the Markdown table, append it to the job summary and upload it."""
    from pathlib import Path

    import yaml

    wf = yaml.safe_load((Path(__file__).resolve().parent.parent / ".github/workflows/nightly.yml").read_text())
    steps = wf["jobs"]["smoke"]["steps"]
    by_id = {s.get("id"): s for s in steps if s.get("id")}
    grid, check = by_id["grid"], by_id["check"]
    assert "bench.run --grid smoke" in grid["run"] and "always()" not in str(grid.get("if", ""))
    assert "always()" in check["if"] and "bench.check" in check["run"] and "--markdown results/check.md" in check["run"]
    later = steps[steps.index(check) + 1:]
    summary = [s for s in later if "GITHUB_STEP_SUMMARY" in s.get("run", "")]
    assert summary and "always()" in summary[0]["if"] and "results/check.md" in summary[0]["run"]
    upload = [s for s in later if "upload-artifact" in s.get("uses", "")]
    assert upload and "always()" in upload[0]["if"] and "results/check.md" in upload[0]["with"]["path"]


@pytest.mark.parametrize("commits, ok", [(["abc"], True), (["abc-dirty"], False), (["abc", "def"], False)])
def test_update_takes_one_clean_commit_only(tmp_path, commits, ok, capsys):
    from bench.errors import BenchError

    for i, r in enumerate(rows()):
        r["git_commit"] = commits[i % len(commits)]
        write_row(tmp_path / "runs", r)
    argv = ["--update", "--grid", "g", "--out", str(tmp_path), "--baseline", str(tmp_path / "ref.parquet")]
    if ok:
        assert main(argv) == 0 and len(pd.read_parquet(tmp_path / "ref.parquet")) == len(rows())
    else:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == BenchError.exit_code and "one clean commit" in capsys.readouterr().err
        assert not (tmp_path / "ref.parquet").exists()
        assert main([*argv, "--allow-dirty"]) == 0


def test_other_configuration_is_reported_not_compared(setup):
    """A cell rerun with other settings (more samples: another cell key) is never compared with, or averaged into,
    the reference: the check names the setting that differs, even when the numbers would pass."""
    tmp_path, ref = setup
    ref_df = read_runs(tmp_path / "runs")
    cur = ref_df.copy()
    sel = (cur["method"] == "eda-dm") & (cur["seed"] == 1)
    cur.loc[sel, "cell_key"] = "eda-dm-W4A8-1-s64"
    cur.loc[sel, "samples"] = 64
    bad, compared = compare(ref_df, cur)
    assert len(bad) == 1 and "configuration differs from the reference: samples 16 -> 64" in bad["reason"].iloc[0]
    assert compared == 3 * 2  # eda-dm still compared on its two other seeds
