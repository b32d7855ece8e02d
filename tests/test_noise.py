"""bench.noise: variant parsing, the spreads and the page computed from rows, and one end-to-end measurement of a
tiny grid through bench.run (the env variables and flags of a variant must reach the Ray workers)."""

import math

import pandas as pd
import pytest

from bench.reporting.regression import window
from bench.errors import UsageError
from bench.studies.noise import (BASE, SEEDS, Variant, float_deltas, main, parse_variant, parse_variants, read_rows, render,
                         spreads, variant_checks)
from bench.harness.store import empty_row


def test_parse_variants():
    v = parse_variant("threads=2+batch=32+isa=avx2+onednn=off")
    assert (v.threads, v.batch, v.isa, v.onednn) == (2, 32, "avx2", False)
    assert v.run_args() == ["--cpus-per-worker", "2", "--batch-size", "32", "--import", "bench.harness.nomkldnn"]
    assert v.env()["ATEN_CPU_CAPABILITY"] == "avx2" and v.env()["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert v.kind == "float" and Variant(BASE).kind == BASE and Variant(SEEDS, seeds=(2,)).kind == SEEDS
    assert [x.name for x in parse_variants("base,repeat,batch=16")] == ["base", "repeat", "batch=16"]
    for bad in ("base,threads=x", "base,isa=neon", "base,colour=red", "batch=16", "base,batch=0", "base,base"):
        with pytest.raises(UsageError):
            parse_variants(bad)


def row(variant, method, bits, seed, **metrics):
    r = empty_row()
    r.update(grid="smoke", model="digits-ddpm", method=method, bits=bits, seed=seed, status="ok", error="",
             cell_key=f"{variant}-{method}-{bits}-{seed}", git_commit="abc", threads=1, cpu_kernels="AVX512",
             time=pd.Timestamp("2026-01-01", tz="UTC"), **metrics)
    r["variant"] = variant
    return r


def synthetic():
    rows = []
    for s in (0, 1):
        rows.append(row(BASE, "fp", "FP", s, eps_mse=0.0, digits_fid=50.0 + s))
        rows.append(row(BASE, "rtn", "W4A8", s, eps_mse=0.02 + 0.001 * s, digits_fid=60.0 + s))
        rows.append(row("batch=32", "fp", "FP", s, eps_mse=0.0, digits_fid=50.0 + s))
        rows.append(row("batch=32", "rtn", "W4A8", s, eps_mse=(0.02 + 0.001 * s) * 1.01, digits_fid=60.0 + s - 0.3))
    for s in (2, 3):
        rows.append(row(SEEDS, "rtn", "W4A8", s, eps_mse=0.02 + 0.001 * s, digits_fid=60.0 + s))
    return pd.DataFrame(rows)


def test_spreads_from_rows():
    rows = synthetic()
    d = float_deltas(rows)
    assert set(d["variant"]) == {"batch=32"} and len(d) == 2 * 2 * 2  # 2 cells x 2 seeds x 2 metrics
    sp = spreads(rows).set_index(["metric", "method"])
    eps = sp.loc[("eps_mse", "rtn")]
    assert eps["float_max_abs"] == pytest.approx(0.021 * 0.01) and eps["float_max_rel"] == pytest.approx(0.01)
    assert eps["seed_n"] == 4 and eps["seed_sd"] == pytest.approx(pd.Series([0.020, 0.021, 0.022, 0.023]).std())
    assert eps["float_max_of_window"] == pytest.approx(0.021 * 0.01 / window("eps_mse", 0.021))
    fid = sp.loc[("digits_fid", "rtn")]
    assert fid["float_max_abs"] == pytest.approx(0.3) and fid["float_identical"] == 0
    assert sp.loc[("digits_fid", "fp"), "float_identical"] == 2 and sp.loc[("digits_fid", "fp"), "float_max_abs"] == 0


def test_variant_checks_and_page():
    rows = synthetic()
    checks = variant_checks(rows).set_index("variant")
    assert checks.loc["batch=32", "problems"] == 0 and not checks.loc["batch=32", "bit_identical"]
    worse = rows.copy()
    worse.loc[(worse["variant"] == "batch=32") & (worse["method"] == "rtn"), "eps_mse"] *= 1.5
    assert variant_checks(worse).set_index("variant").loc["batch=32", "problems"] == 1
    runs = pd.DataFrame([{"variant": v, "kind": "float", "what": v, "exit": 0, "seconds": 1.0,
                          "command": f"python -m bench.run {v}"} for v in (BASE, "batch=32", SEEDS)])
    env = {"command": "python -m bench.noise", "device": "CPU", "versions": {"torch": "x"}, "git_commit": "abc",
           "time": "now", "load_average": 1.0}
    page = render(rows, runs, spreads(rows), checks.reset_index(), env)
    assert "python -m bench.run batch=32" in page and "passes" in page and "`abc`" in page
    assert "| MSE(eps) (`eps_mse`) | lower | 0.00021 | 1% |" in page  # rendered from the rows, not typed in


def test_render_only_reads_its_own_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--render-only", "--out", str(tmp_path)])
    assert e.value.code == 1 and "run `python -m bench.noise` first" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_tiny_grid(tmp_path):
    """Two real runs of a tiny grid through bench.run (one Ray start-up each, about a minute): the variant's batch size, ISA cap and oneDNN switch reach the
    Ray workers (recorded in the rows), the outputs are written, and --render-only reproduces the page."""
    grid = tmp_path / "t.toml"
    grid.write_text('name = "t"\nimports = ["tests.harness_plugin"]\n[defaults]\nmethods = ["fp", "test-ok"]\n'
                    'bits = ["W4A8"]\nseeds = [0]\nsamples = 4\nbatch_size = 4\nmetrics = []\n'
                    '[[model]]\nname = "test-tiny"\n')
    out = tmp_path / "out"
    assert main(["--grid", str(grid), "--variants", "base,batch=2+isa=avx2+onednn=off", "--extra-seeds", "",
                 "--out", str(out), "--no-progress"]) == 0
    rows, runs, env = read_rows(out / "noise" / "rows.parquet")
    v = rows[rows["variant"] == "batch=2+isa=avx2+onednn=off"]
    assert len(v) == 2 and (v["status"] == "ok").all() and (v["batch_size"] == 2).all()
    assert v["cpu_kernels"].str.startswith("AVX2").all() and v["cpu_kernels"].str.contains("oneDNN off").all()
    assert (rows.loc[rows["variant"] == BASE, "batch_size"] == 4).all() and list(runs["variant"]) == [
        "base", "batch=2+isa=avx2+onednn=off"]
    page = (out / "noise.md").read_text()
    assert "ATEN_CPU_CAPABILITY=avx2" in page and "mse_vs_fp" in page and not math.isnan(
        spreads(rows).set_index(["metric", "method"]).loc[("mse_vs_fp", "test-ok"), "float_max_abs"])
    (out / "noise.md").unlink()
    assert main(["--render-only", "--out", str(out)]) == 0 and (out / "noise.md").read_text() == page


def test_a_variant_that_did_not_reach_the_workers_is_an_error():
    """An env variable that never reached the Ray workers would measure nothing and look like perfect stability."""
    from bench.errors import BenchError
    from bench.studies.noise import _check_applied

    rows = synthetic()
    _check_applied(Variant(BASE), rows)
    with pytest.raises(BenchError, match="did not take effect.*AVX2"):
        _check_applied(parse_variant("isa=avx2"), rows)
    with pytest.raises(BenchError, match="threads"):
        _check_applied(parse_variant("threads=2"), rows)


def test_variant_check_compares_cells_whatever_their_order():
    """A rerun whose cells finished (and were read back) in another order is still bit-identical to base."""
    from bench.studies.noise import variant_checks

    rows = synthetic()
    base = rows[rows["variant"] == BASE]
    again = base.iloc[::-1].assign(variant="repeat")
    out = variant_checks(pd.concat([rows, again], ignore_index=True))
    assert bool(out.set_index("variant").loc["repeat", "bit_identical"]) is True


def test_an_interrupted_measurement_of_the_same_commit_resumes(tmp_path, monkeypatch):
    import bench.studies.noise as noise

    rows = synthetic()
    runs = pd.DataFrame([{"variant": v, "kind": "float", "what": v, "exit": 0, "seconds": 1.0, "command": "x"}
                         for v in rows["variant"].unique()])
    env = {"command": "c", "device": "d", "versions": {}, "git_commit": "abc", "time": "t", "load_average": 0.0}
    noise.write_outputs(rows, runs, env, tmp_path, tmp_path / "noise.md")
    got = noise._previous(tmp_path / "noise" / "rows.parquet", rows["grid"].iloc[0], "abc")
    assert got is not None and set(got[1]["variant"]) == set(rows["variant"])
    assert noise._previous(tmp_path / "noise" / "rows.parquet", rows["grid"].iloc[0], "def") is None
    assert noise._previous(tmp_path / "noise" / "rows.parquet", rows["grid"].iloc[0], "abc-dirty") is None
