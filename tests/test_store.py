"""The results store: typed round trip, atomic writes (no half-written file is ever read), no lost rows."""

import multiprocessing as mp
import os

import pandas as pd
import pytest

from bench.harness.store import SCHEMA, done_keys, empty_row, partition_dir, read_file, read_runs, write_file, write_row


def make_row(key="k0", method="eda-dm:tdac-only", seed=0, status="ok", fid=1.0, time=None, grid="g"):
    r = empty_row()
    r.update(grid=grid, model="digits-ddpm", method=method, cell_key=key, run_id="r1", bits="W4A8", w_bits=4,
             a_bits=8, seed=seed, samples=16, status=status, error="", digits_fid=fid, eps_mse_per_step=[0.1, 0.2],
             allocation=[3, 1], time=pd.Timestamp(time or "2026-01-01", tz="UTC"))
    return r


def test_round_trip_with_stable_types(tmp_path):
    write_row(tmp_path, make_row("a"))
    write_row(tmp_path, make_row("b", method="rtn", seed=1, status="failed", fid=float("nan")))
    df = read_runs(tmp_path)
    assert len(df) == 2 and list(df.columns) == SCHEMA.names
    assert set(df["method"]) == {"eda-dm:tdac-only", "rtn"}  # ':' survives the hive directory name
    assert str(df["seed"].dtype) == "Int32" and str(df["calib_size"].dtype) == "Int32"  # nullable, never float
    assert df["digits_fid"].dtype == "float64" and df["model"].dtype != "category"
    row = df.set_index("cell_key").loc["a"]
    assert list(row["eps_mse_per_step"]) == [0.1, 0.2] and list(row["allocation"]) == [3, 1]
    assert done_keys(tmp_path, "g") == {"a"}  # failed cells are not done: resume retries them
    assert read_runs(tmp_path, grid="other").empty
    assert list(read_runs(tmp_path / "missing").columns) == SCHEMA.names


def test_latest_row_per_cell_wins(tmp_path):
    write_row(tmp_path, make_row("a", status="failed", time="2026-01-01"))
    write_row(tmp_path, make_row("a", status="ok", fid=2.0, time="2026-01-02"))
    df = read_runs(tmp_path)
    assert len(df) == 1 and df["status"][0] == "ok" and df["digits_fid"][0] == 2.0
    assert len(read_runs(tmp_path, latest=False)) == 2


def test_half_written_file_is_never_read(tmp_path):
    final = write_row(tmp_path, make_row("a"))
    d = partition_dir(tmp_path, "g", "digits-ddpm", "rtn")
    d.mkdir(parents=True)
    # a writer killed mid-write leaves its dotfile temp (truncated): discovery skips it
    (d / ".tmp-deadbeef.parquet").write_bytes(final.read_bytes()[:50])
    (final.parent / "_samples").mkdir()
    (final.parent / "_samples" / "x.png").write_bytes(b"\x89PNG")
    df = read_runs(tmp_path)
    assert list(df["cell_key"]) == ["a"]


def _writer(root, worker, n):
    for i in range(n):
        write_row(root, make_row(f"w{worker}-{i}", method=["rtn", "fp"][i % 2]))


def test_parallel_writers_lose_no_rows(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    df = read_runs(tmp_path)
    assert len(df) == 100 and df["cell_key"].nunique() == 100
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp")]
    assert leftovers == []


def test_reference_file_round_trip(tmp_path):
    write_row(tmp_path / "runs", make_row("a"))
    write_row(tmp_path / "runs", make_row("b", method="rtn"))
    df = read_runs(tmp_path / "runs")
    ref = write_file(df, tmp_path / "ref.parquet")
    back = read_file(ref)
    assert list(back.columns) == SCHEMA.names
    pd.testing.assert_frame_equal(back.sort_values("cell_key").reset_index(drop=True),
                                  df.sort_values("cell_key").reset_index(drop=True), check_dtype=True)
    with pytest.raises(Exception, match="no results file"):
        read_file(tmp_path / "nope.parquet")


def test_rows_from_a_results_file_seed_a_store_unchanged(tmp_path):
    from bench.harness.store import import_rows, importable_rows

    write_row(tmp_path / "runs", make_row("a"))  # missing strings, NaN metrics, lists, nullable ints
    write_row(tmp_path / "runs", make_row("b", method="rtn", status="failed"))
    write_row(tmp_path / "runs", make_row("c", method="rtn", grid="other"))
    committed = read_file(write_file(read_runs(tmp_path / "runs"), tmp_path / "rows.parquet"))
    rows = importable_rows(committed, "g", {"a", "b", "z"})
    assert list(rows["cell_key"]) == ["a"]  # a failed row is no result; another grid's row is not this grid's
    fresh = tmp_path / "fresh"
    assert import_rows(fresh, rows) == 1 and import_rows(fresh, rows) == 0  # a second import adds nothing
    back = read_runs(fresh)
    pd.testing.assert_frame_equal(back, read_runs(tmp_path / "runs", grid="g").query("cell_key == 'a'")
                                  .reset_index(drop=True), check_dtype=True)
    assert done_keys(fresh, "g") == {"a"}


NODE_COLUMNS = ("node_id", "gpu_name", "gpu_count", "cuda_version", "gpu_driver")


def test_rows_written_before_the_node_columns_still_read(tmp_path):
    """Stores and committed references written before the node/GPU columns: those read back as nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.harness.store import FILE_SCHEMA, _table

    old_schema = pa.schema([f for f in FILE_SCHEMA if f.name not in NODE_COLUMNS])
    d = partition_dir(tmp_path / "runs", "g", "digits-ddpm", "rtn")
    d.mkdir(parents=True)
    pq.write_table(_table([make_row("old", method="rtn")], old_schema), d / "old-0.parquet")
    write_row(tmp_path / "runs", {**make_row("new", method="rtn"), "node_id": "abc", "gpu_name": "NVIDIA H200",
                                  "gpu_count": 1, "cuda_version": "12.8", "gpu_driver": "570.1"})
    df = read_runs(tmp_path / "runs")
    assert list(df.columns) == SCHEMA.names and str(df["gpu_count"].dtype) == "Int32"
    df = df.set_index("cell_key")
    assert df.loc["old", list(NODE_COLUMNS)].isna().all()
    assert df.loc["new", "node_id"] == "abc" and df.loc["new", "gpu_count"] == 1
    # a flat reference file of old rows (bench.check --baseline) too
    flat = tmp_path / "ref.parquet"
    pq.write_table(_table([make_row("old")], pa.schema(list(SCHEMA)[:3] + list(old_schema))), flat)
    ref = read_file(flat)
    assert len(ref) == 1 and ref[list(NODE_COLUMNS)].isna().all(axis=None)


def test_node_info_fills_gpu_columns_only_on_a_gpu_worker(monkeypatch):
    import torch

    from bench.harness import provenance

    monkeypatch.setattr(provenance, "node_id", lambda: "node-1")
    cpu = provenance.node_info("cpu")
    assert cpu == {"node_id": "node-1", "gpu_name": None, "gpu_count": None, "cuda_version": None, "gpu_driver": None}
    # a GPU worker (faked: no GPU on the test machine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(provenance, "gpu_driver", lambda: "570.86.15")
    gpu = provenance.node_info("cuda")
    assert gpu == {"node_id": "node-1", "gpu_name": "NVIDIA H200", "gpu_count": 1, "cuda_version": "12.8",
                   "gpu_driver": "570.86.15"}
    assert set(gpu) <= set(SCHEMA.names)


def test_node_id_outside_ray_is_none():
    import ray

    from bench.harness.provenance import node_id

    if not ray.is_initialized():
        assert node_id() is None


def test_a_corrupt_results_file_is_one_error_line(tmp_path):
    bad = tmp_path / "rows.parquet"
    bad.write_text("junk")
    with pytest.raises(Exception, match="is not a readable Parquet results file .*restore it from git"):
        read_file(bad)
