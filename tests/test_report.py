"""bench.report: paper-style tables (mean ± 95% CI over seeds, best in bold), LaTeX booktabs and plots."""

import math

import pandas as pd
import pytest
import torch

from bench.harness.cell import sample_grid_png
from bench.report import main
from bench.reporting.tables import aggregate, bits_order, mean_ci, model_table
from bench.harness.store import empty_row, write_row


def make_store(root):
    for meth, base in (("fp", 1.0), ("rtn", 5.0), ("eda-dm", 2.0)):
        for bits in (["FP"] if meth == "fp" else ["W8A8", "W4A8"]):
            for seed in range(3):
                r = empty_row()
                rel = f"grid=g/model=m/method={meth}/_samples/{bits}-{seed}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(sample_grid_png(torch.rand(16, 1, 8, 8) * 2 - 1))
                w = 32 if bits == "FP" else int(bits[1])
                r.update(grid="g", model="m", method=meth, bits=bits, w_bits=w, a_bits=8, seed=seed, samples=16,
                         status="ok", error="", cell_key=f"{meth}{bits}{seed}", run_id="r1", git_commit="abc",
                         dataset="digits", sampler="ddim4", digits_fid=base * (8 / w if w < 32 else 1) + 0.1 * seed,
                         digits_coverage=0.9 - 0.01 * seed, quant_seconds=3.0, sample_grid=rel,
                         eps_mse_per_step=None if meth == "fp" else [0.1, 0.05, 0.01],
                         allocation=[5, 2, 1] if meth == "eda-dm" else None, time=pd.Timestamp.now(tz="UTC"))
                write_row(root, r)
    bad = empty_row()
    bad.update(grid="g", model="m", method="rtn", bits="W3A8", seed=0, status="failed", error="ValueError: x",
               cell_key="bad", run_id="r1", time=pd.Timestamp.now(tz="UTC"))
    write_row(root, bad)


def add_rtn_row(root, **kw):
    """One more ok rtn W8A8 row (seed 3) next to make_store's, with the given fields changed."""
    r = empty_row()
    r.update(grid="g", model="m", method="rtn", bits="W8A8", w_bits=8, a_bits=8, seed=3, samples=16, status="ok",
             error="", run_id="r2", git_commit="abc", dataset="digits", sampler="ddim4", digits_fid=5.0,
             time=pd.Timestamp.now(tz="UTC"))
    r.update(kw)
    write_row(root, r)


def test_mean_ci():
    m, h, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.303 * 1 / math.sqrt(3), rel=1e-3)  # t(0.975, 2) = 4.303
    assert math.isnan(mean_ci([1.0])[1]) and mean_ci([float("nan")])[2] == 0


def test_bits_order():
    assert bits_order(["W4A8", "FP", "W8A8", "W4A6", "W3A8"]) == ["FP", "W8A8", "W4A8", "W4A6", "W3A8"]


def test_report_tables_and_plots(tmp_path, capsys):
    make_store(tmp_path / "runs")
    assert main(["--out", str(tmp_path), "--grid", "g"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| Method | W8A8 dFID↓ | W8A8 dCov↑ | W4A8 dFID↓ | W4A8 dCov↑ |" in md
    eda = next(ln for ln in md.splitlines() if ln.startswith("| eda-dm "))
    assert eda.count("**") == 8 and "±" in eda  # best in every column, with a CI over 3 seeds
    fp = next(ln for ln in md.splitlines() if ln.startswith("| fp "))
    assert "**" not in fp  # FP is the reference, never bolded
    assert "| m | rtn | W3A8 | 0 | ValueError: x |" in md  # failed cells listed
    tex = (tmp_path / "tables" / "g-m.tex").read_text()
    for s in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{", r"$\pm$", r"\multicolumn{2}{c}{W8A8}"):
        assert s in tex
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    for stem in ("g-m-digits_fid-vs-bits", "g-m-quant-time", "g-m-eps-mse-per-step", "g-m-allocation", "g-m-samples"):
        assert {f"{stem}.png", f"{stem}.svg"} <= plots


def test_latex_escapes_and_empty_store(tmp_path):
    make_store(tmp_path / "runs")
    from bench.harness.store import read_runs

    df = read_runs(tmp_path / "runs")
    df = df[df["status"] == "ok"]
    df.loc[df["method"] == "eda-dm", "method"] = "eda_dm"
    tex = model_table(aggregate(df, ["digits_fid"]), "m", ["fp", "rtn", "eda_dm"], ["digits_fid"], latex=True)
    assert r"eda\_dm" in tex
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "empty")])
    assert e.value.code == 2


def test_report_refuses_mixed_or_dirty_commits_unless_told(tmp_path, capsys):
    """A table averages rows of one clean commit; rows of two commits or of a dirty tree are refused with one line
    naming them, and --allow-mixed shows them with every commit listed."""
    make_store(tmp_path / "runs")
    add_rtn_row(tmp_path / "runs", cell_key="late", git_commit="def456-dirty")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--grid", "g", "--no-plots"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "abc (" in err and "def456-dirty (1 cells)" in err and "--allow-mixed" in err
    assert not (tmp_path / "report.md").exists()
    assert main(["--out", str(tmp_path), "--grid", "g", "--no-plots", "--allow-mixed"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "mixed commits" in md and "abc (" in md and "def456-dirty (1 cells)" in md


def test_report_names_the_one_clean_commit(tmp_path):
    make_store(tmp_path / "runs")
    assert main(["--out", str(tmp_path), "--grid", "g", "--no-plots"]) == 0
    assert "commit abc;" in (tmp_path / "report.md").read_text()


def test_report_never_averages_two_configurations(tmp_path, capsys):
    """Rows of one (model, method, bits) with another sample count are refused, not averaged over seeds."""
    make_store(tmp_path / "runs")
    add_rtn_row(tmp_path / "runs", cell_key="more", samples=64)
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--grid", "g", "--no-plots"])
    assert e.value.code == 2
    assert "m rtn W8A8 has rows with different samples (16 | 64)" in capsys.readouterr().err
