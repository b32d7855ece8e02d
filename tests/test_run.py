"""bench.run end to end on Ray with a tiny random UNet and fake methods (tests/harness_plugin.py)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.run import main
from bench.harness.store import read_runs
from tests.conftest_ray import ray_session  # noqa: F401 - the session-wide Ray cluster

PLUGIN = "tests.harness_plugin"


def write_grid(tmp_path, methods, bits=("W8A8", "W4A8"), seeds=(0,), extra="", more="", plugins=(PLUGIN,),
               metrics=None):
    metrics_line = "" if metrics is None else f"metrics = {list(metrics)}"
    p = tmp_path / "t.toml"
    p.write_text(f"""
name = "t"
imports = {list(plugins)}
[defaults]
methods = {list(methods)}
bits = {list(bits)}
seeds = {list(seeds)}
samples = 8
batch_size = 8
{metrics_line}
{extra}
[[model]]
name = "test-tiny"
{more}""".replace("'", '"'))
    return str(p)


def run(*argv):
    try:
        return main([*argv, "--no-progress"])
    except SystemExit as e:
        return e.code


def test_crash_retry_failure_and_shared_artifacts(ray_session, tmp_path):  # noqa: F811
    marker = tmp_path / "crashed-once"
    # one more block on the same model: a single cell whose worker dies every time
    extra = f'[method."test-crash"]\nmarker = "{marker}"\n'
    grid = write_grid(tmp_path, ["fp", "test-ok", "test-raise", "test-crash"], extra=extra,
                      more='[[model]]\nname = "test-tiny"\nmethods = ["test-abort"]\nbits = ["W3A8"]\n')
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out), "--retries", "1") == 1  # failed cells -> exit status 1
    df = read_runs(out / "runs").set_index(["method", "bits"])
    assert len(df) == 8
    # a cell whose worker always dies is retried a bounded number of times, then recorded as failed
    assert df.loc[("test-abort", "W3A8"), "status"] == "failed"
    assert "worker crashed 2 times" in df.loc[("test-abort", "W3A8"), "error"]
    assert "out-of-memory killer" in df.loc[("test-abort", "W3A8"), "error"]
    # the cell that raised is recorded with its error; the grid went on
    for bits in ("W8A8", "W4A8"):
        assert df.loc[("test-raise", bits), "status"] == "failed"
        assert "planted failure" in df.loc[("test-raise", bits), "error"]
    # the worker killed mid-cell (os._exit) was restarted and its cell re-run to completion
    assert marker.exists()
    crash = df.loc["test-crash"]
    assert (crash["status"] == "ok").all() and sorted(crash["attempts"]) == [1, 2]
    ok = df[df["status"] == "ok"]
    assert len(ok) == 5 and ok["eps_mse"].notna().all() and (ok.loc["fp", "eps_mse"] == 0).all()
    assert ok.loc[("test-ok", "W4A8"), "eps_mse"] > ok.loc[("test-ok", "W8A8"), "eps_mse"] > 0
    assert ok["git_commit"].notna().all() and ok["versions"].str.contains("torch").all()
    # FP trajectories and FP samples: computed once for the whole grid, not once per cell
    cache = out / "cache"
    assert len(list((cache / "trajectories").glob("*.pt"))) == 1
    assert len([d for d in (cache / "fp_images").iterdir() if (d / "done.json").is_file()]) == 1
    assert not list((cache / "fp_images").glob(".tmp-*"))  # no half-written shard folder left behind
    # per-cell logs and sample grids
    assert len(list((out / "logs" / "t").rglob("*.log"))) == 8
    for rel in ok["sample_grid"]:
        assert (out / "runs" / rel).is_file()


def test_resume_recomputes_only_missing_cells(ray_session, tmp_path):  # noqa: F811
    grid = write_grid(tmp_path, ["fp", "test-ok"])
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out)) == 0
    first = read_runs(out / "runs")
    assert len(first) == 3 and first["run_id"].nunique() == 1
    # an interrupted run: one finished cell never reached the store
    victim = first[first["bits"] == "W4A8"].iloc[0]
    files = list((out / "runs").rglob(f"{victim['cell_key']}-*.parquet"))
    assert len(files) == 1
    files[0].unlink()
    assert run("--grid", grid, "--out", str(out)) == 0
    second = read_runs(out / "runs").set_index("cell_key")
    assert len(second) == 3
    rerun = second[second["run_id"] != first["run_id"][0]]
    assert list(rerun.index) == [victim["cell_key"]]  # only the missing cell was recomputed
    assert len(list((out / "runs").rglob("*.parquet"))) == 3
    # nothing left: a third run does nothing; --no-resume reruns everything
    assert run("--grid", grid, "--out", str(out)) == 0
    assert len(read_runs(out / "runs", latest=False)) == 3


def test_resume_from_a_committed_file_runs_only_the_cells_it_lacks(ray_session, tmp_path, capsys):  # noqa: F811
    from bench.harness.store import write_file

    grid = write_grid(tmp_path, ["fp", "test-ok"])
    assert run("--grid", grid, "--out", str(tmp_path / "first")) == 0
    first = read_runs(tmp_path / "first" / "runs")
    kept = first[first["bits"] != "W4A8"]  # the committed file lacks one finished cell
    other = first[first["bits"] == "W4A8"].assign(grid="another-grid")  # and holds a row of another grid
    committed = tmp_path / "rows.parquet"
    write_file(pd.concat([kept, other], ignore_index=True), committed)
    out = tmp_path / "fresh"  # the original --out is gone
    assert run("--grid", grid, "--out", str(out), "--resume-from", str(committed), "--dry-run") == 0
    text = capsys.readouterr().out
    assert "2 finished cell(s) of grid t (dry run: not imported)" in text and "1 to run (2 already" in text
    assert not (out / "runs").exists()  # a dry run writes nothing
    assert run("--grid", grid, "--out", str(out), "--resume-from", str(committed)) == 0
    rows = read_runs(out / "runs").set_index("cell_key")
    assert len(rows) == 3 and set(rows["grid"]) == {"t"}
    imported = rows.loc[list(kept["cell_key"])]
    assert set(imported["run_id"]) == {first["run_id"][0]}  # imported as they were: not recomputed
    rerun = rows[rows["run_id"] != first["run_id"][0]]
    assert list(rerun.index) == list(first[first["bits"] == "W4A8"]["cell_key"])
    # importing again adds nothing; --no-resume with --resume-from is a usage error
    assert run("--grid", grid, "--out", str(out), "--resume-from", str(committed)) == 0
    assert "0 imported" in capsys.readouterr().out and len(read_runs(out / "runs", latest=False)) == 3
    assert run("--grid", grid, "--out", str(out), "--resume-from", str(committed), "--no-resume") == 2


def test_dry_run_full_plans_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))  # an empty data folder, whatever this machine has
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    assert run("--grid", "full", "--dry-run") == 0
    text = capsys.readouterr().out
    methods = ["fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm", "eda-dm:tdac-only", "eda-dm:fbr-only"]
    models = ["cifar10-ddim", "lsun-bedroom-ldm4", "lsun-church-ldm8", "imagenet-ldm4", "sd-v1-4"]
    assert "grid full: 65 cells" in text  # 5 models x (fp + 6 methods x 2 settings)
    blocks = text.split("\nmodel ")[1:]
    assert [b.split()[0] for b in blocks] == models
    for b in blocks:
        lines = {ln.split()[0]: ln.split()[1:] for ln in b.splitlines()[2:] if ln.startswith("  ") and ln.split()}
        for m in methods:
            assert lines[m][:-5] == (["FP"] if m == "fp" else ["W8A8", "W4A8"]), (m, lines[m])
            n = 1 if m == "fp" else 2
            assert lines[m][-5:] == [str(n), "cells,", str(n), "to", "run"], (m, lines[m])
        assert "available" in b.splitlines()[0] or "UNAVAILABLE" in b.splitlines()[0]
        assert b.splitlines()[2].startswith("  reference data")
    assert "resources:" in text
    # no CIFAR-10 images or statistics on this machine: the plan says so, and where to put them
    cifar = blocks[0].splitlines()[2]
    assert "reference data MISSING: no reference images for cifar10 (split 'train')" in cifar
    assert "run `python -m bench.prepare cifar10 cifar-10-python.tar.gz`" in cifar  # what to prepare, by name


def test_dry_run_counts_each_block_of_a_repeated_model(tmp_path, capsys):
    # digits.toml lists one model in several blocks; each line counts its own block's cells and what is left
    grid = write_grid(tmp_path, ["fp", "test-ok"], bits=("W8A8", "W4A8"), seeds=(0, 1),
                      more='[[model]]\nname = "test-tiny"\nmethods = ["test-ok"]\nbits = ["W3A8"]\n')
    assert run("--grid", grid, "--dry-run", "--out", str(tmp_path / "out")) == 0
    text = capsys.readouterr().out
    assert "grid t: 8 cells, 8 to run (0 already in the store)" in text
    lines = [ln.split() for ln in text.splitlines() if ln.startswith("  test-ok")]
    assert lines == [["test-ok", "W8A8", "W4A8", "4", "cells,", "4", "to", "run"],
                     ["test-ok", "W3A8", "2", "cells,", "2", "to", "run"]]


def test_dry_run_says_an_actor_with_several_gpus_uses_one(tmp_path, capsys, monkeypatch):
    import bench.harness.driver as driver

    monkeypatch.setattr(driver, "local_resources", lambda: {"CPU": 16.0, "GPU": 4.0})  # a 4-GPU machine
    grid = write_grid(tmp_path, ["test-ok"], bits=("W8A8",))
    assert run("--grid", grid, "--dry-run", "--out", str(tmp_path / "out"), "--gpus-per-worker", "2") == 0
    assert "note: actors of the grid (2) reserve several GPUs each but run each cell on the first" in \
        capsys.readouterr().out
    assert run("--grid", grid, "--dry-run", "--out", str(tmp_path / "out")) == 0
    assert "reserve several GPUs" not in capsys.readouterr().out


def test_unavailable_model_fails_fast(tmp_path, capsys):
    from bench.models.zoo import model_availability

    if model_availability("cifar10-ddim")[0]:
        pytest.skip("cifar10-ddim weights are present on this machine")
    out = tmp_path / "out"
    assert run("--grid", "full", "--models", "cifar10-ddim", "--methods", "fp,rtn", "--out", str(out)) == 1
    df = read_runs(out / "runs")
    assert len(df) == 3 and (df["status"] == "failed").all()
    assert df["error"].str.contains("cifar10-ddim is unavailable").all()


@pytest.mark.parametrize("argv, msg", [
    (["--grid", "nope"], "unknown grid"),
    (["--methods", "nope"], "unknown method"),
    (["--bits", "W1A8"], "bad bit setting"),
    (["--models", "nope"], "not in grid"),
    (["--seeds", "a"], "bad --seeds"),
    (["--set", "novalue"], "bad --set"),
    (["--runtime-env-json", "{x"], "--runtime-env-json is not valid JSON"),
])
def test_usage_errors_exit_2(argv, msg, capsys, tmp_path):
    assert run(*argv, "--dry-run", "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_unknown_model_in_grid_file(tmp_path, capsys):
    p = Path(write_grid(tmp_path, ["fp"]))
    p.write_text(p.read_text().replace("test-tiny", "no-such-model"))
    assert run("--grid", str(p), "--dry-run") == 2
    assert "unknown model(s) no-such-model" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--grid", "--address", "--out", "--no-resume", "--dry-run", "--max-workers", "--samples", "--seeds",
                 "--methods", "--bits", "--set", "--models", "--gpus-per-worker", "--import",
                 "--runtime-env-json"):
        assert flag in text


def test_cell_log_lines_reach_the_driver_while_the_cell_runs(ray_session, tmp_path, capsys):  # noqa: F811
    import time

    import ray

    import tests.harness_plugin  # noqa: F401 - registers test-tiny / test-slow in the driver
    from bench.harness.grid import Cell
    from bench.harness.plan import calibration_requests
    from bench.harness.worker import execute

    signal = tmp_path / "driver-saw-a-line"
    cell = Cell(grid="t", model="test-tiny", method="test-signal", bits="W8A8", seed=0, samples=8, batch_size=4,
                overrides={"until": str(signal)})
    events = []

    def on_log(label, line):
        events.append((time.monotonic(), "log", label, line))
        if "sampling batch" in line:
            signal.touch()  # the cell, still inside quantize, waits for this before it finishes

    stats = execute([cell], calibration_requests([cell]), {"run_id": "r"},
                    lambda c, result, attempts: events.append((time.monotonic(), "result", c.label(), result)),
                    num_workers=1, cpus_per_worker=1, gpus_per_worker=0, imports=[PLUGIN],
                    cache_root=str(tmp_path / "cache"), keep_actors=True, on_log=on_log)
    assert stats["ok"] == 1
    logs = [e for e in events if e[1] == "log"]
    (result,) = [e for e in events if e[1] == "result"]
    assert {e[2] for e in logs} == {cell.label()}
    text = "\n".join(e[3] for e in logs)
    assert "sampling batch 1/2" in text and "calibration trajectories" in text and "status ok" in text
    # the sampling lines reached the driver while the cell was still quantizing (it waited for the driver's signal),
    # not with its result; a timing assertion here would fail on a loaded machine
    assert json.loads(result[3]["row"]["info"]).get("saw_driver_signal") is True, text
    assert logs[-1][0] <= result[0]  # every line of a cell comes before its end
    # the row says where it ran: this node, no GPU
    row = result[3]["row"]
    assert row["node_id"] == ray.get_runtime_context().get_node_id()
    assert row["gpu_name"] is None and row["gpu_count"] is None and row["cuda_version"] is None

    # through bench.run: the lines are printed on stdout with the cell's name (and not with --no-cell-logs)
    grid = write_grid(tmp_path, ["test-ok"], bits=("W8A8",))
    assert run("--grid", grid, "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr()
    assert "[test-tiny/test-ok/W8A8/seed0]" in out.out and "[test-tiny/" not in out.err  # stderr: errors only
    assert run("--grid", grid, "--out", str(tmp_path / "out2"), "--no-cell-logs") == 0
    assert "[test-tiny/" not in capsys.readouterr().out
    assert read_runs(tmp_path / "out" / "runs")["node_id"].notna().all()


def test_cell_logging_takes_in_library_progress_lines_then_silences_them():
    import io
    import logging

    from bench.harness.worker import cell_logging

    buf = io.StringIO()
    lib = logging.getLogger("eda.recon")
    before = (logging.getLogger("eda").level, logging.getLogger("eda").propagate)
    with cell_logging("bench.harness.cell.test", buf, None, "label") as log:
        log.info("own line")
        lib.info("reconstruction unit 1/3: down_blocks.0")
    assert "own line" in buf.getvalue() and "reconstruction unit 1/3" in buf.getvalue()
    lib.info("after the cell")
    assert "after the cell" not in buf.getvalue()
    assert (logging.getLogger("eda").level, logging.getLogger("eda").propagate) == before


def test_model_block_resources_run_and_plan(ray_session, tmp_path, capsys):  # noqa: F811
    grid = write_grid(tmp_path, ["fp", "test-ok"], bits=("W8A8",), more='resources = { cpus = 1, memory = "64MiB" }')
    assert run("--grid", grid, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "model test-tiny (its block's resources): " in text and "memory=0.0625GiB" in text
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out), "--no-cell-logs") == 0  # actors ask Ray for 64 MiB each
    assert (read_runs(out / "runs")["status"] == "ok").all()


def test_save_samples_writes_each_cell_for_rescoring(ray_session, tmp_path):  # noqa: F811
    """--save-samples: every cell's samples land under <out>/samples (not in the cell key: a rerun resumes), and the
    row names the file."""
    from bench.harness.samples import load_samples

    grid = write_grid(tmp_path, ["fp", "test-ok"], bits=("W8A8",))
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out), "--save-samples") == 0
    df = read_runs(out / "runs")
    assert len(df) == 2 and df["samples_file"].notna().all()
    for r in df.itertuples():
        x, meta = load_samples(r.samples_file)
        assert x.shape[0] == 8 and meta["key"] == r.cell_key and meta["method"] == r.method
        assert str(out.resolve() / "samples" / "t" / "test-tiny") in r.samples_file
    assert run("--grid", grid, "--out", str(out)) == 0  # same cells: nothing reruns
    assert len(read_runs(out / "runs", latest=False)) == 2
