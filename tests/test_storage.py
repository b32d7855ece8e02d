"""Storage every node can reach (bench.harness.storage, `bench.run --storage URI`): locks without flock, atomic
writes, the artifact cache and the results dataset on an object store."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from bench.harness.storage import Storage, open_storage

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import json, sys, time
import pyarrow.fs as pafs
from bench.harness.storage import Storage
base, posix, name = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
st = Storage(pafs.LocalFileSystem(), base, posix, base)
with st.lock(st.path("x.lock"), settle_s=0.3, beat_s=0.2):
    t0 = time.time()
    counter = st.path("counter")
    n = int(st.read_bytes(counter)) if st.is_file(counter) else 0
    time.sleep(0.4)  # a second holder inside would read the same n and lose an increment
    st.write_bytes(counter, str(n + 1).encode())
    print(json.dumps([t0, time.time()]), flush=True)
"""


@pytest.mark.parametrize("posix", [True, False], ids=["path", "object-store"])
def test_lock_excludes_other_processes(tmp_path, posix):
    """Three processes increment a counter under the lock: no two hold it at once, no increment is lost. The object
    store protocol (lease object, settle, read back) runs here on a local folder treated as an object store."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "1" if posix else "0", str(i)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for i in range(3)]
    spans = sorted(json.loads(p.communicate(timeout=120)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "counter").read_text() == "3"
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans  # held one after the other
    assert not (tmp_path / "x.lock").exists()  # released


@pytest.mark.parametrize("posix", [True, False], ids=["path", "object-store"])
def test_a_dead_holders_lock_is_taken_over(tmp_path, posix):
    st = Storage(pafs.LocalFileSystem(), str(tmp_path), posix, str(tmp_path))
    lock = tmp_path / "x.lock"
    lock.write_text('{"token": "dead"}')
    old = time.time() - 3600
    os.utime(lock, (old, old))  # its heartbeat stopped an hour ago
    t = time.time()
    with st.lock(str(lock), stale_s=60, settle_s=0.1):
        assert "dead" not in lock.read_text()
    assert time.time() - t < 10 and not lock.exists()
    # a live holder's lock (fresh heartbeat) is waited for, not taken over
    lock.write_text('{"token": "alive"}')
    import threading

    got = []
    th = threading.Thread(target=lambda: st.lock(str(lock), stale_s=60, settle_s=0.1).__enter__() or got.append(1),
                          daemon=True)
    th.start()
    th.join(1.5)
    assert not got and lock.read_text() == '{"token": "alive"}'


def test_open_storage_resolves_paths_and_uris(tmp_path):
    st = open_storage(tmp_path / "a")
    assert st.posix and st.base == str(tmp_path / "a")
    st = open_storage(f"file://{tmp_path}/b")
    assert st.posix and st.base == f"{tmp_path}/b"
    st = open_storage("memory://bucket/x")  # fsspec's in-memory store: an object store
    assert not st.posix
    from bench.errors import UsageError

    with pytest.raises(UsageError, match="cannot open storage 'nosuch://x'") as e:
        open_storage("nosuch://x")
    assert "\n" not in str(e.value)


def test_artifact_cache_on_an_object_store_is_computed_once_across_nodes(tmp_path, monkeypatch):
    """Two nodes (two caches with their own local mirrors) on one object-store URI: the second downloads what the
    first computed, for file and folder artifacts alike."""
    import tempfile

    from bench.harness.artifacts import ArtifactCache

    uri = f"memory://eda-test-{os.getpid()}-{time.time_ns()}/cache"
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(5.0)}

    def fill(folder):
        calls.append(1)
        for i in range(3):
            (folder / f"{i:06d}.npy").write_bytes(b"shard%d" % i)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node1"))
    a = ArtifactCache(uri)
    assert torch.equal(a.get("trajectories", {"s": 1}, compute)["x"], torch.arange(5.0))
    folder_a = a.directory("fp_images", {"s": 1}, fill)
    assert len(calls) == 2 and a.root.is_relative_to(tmp_path / "node1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node2"))
    b = ArtifactCache(uri)
    assert b.root != a.root
    assert torch.equal(b.get("trajectories", {"s": 1}, compute)["x"], torch.arange(5.0))
    folder_b = b.directory("fp_images", {"s": 1}, fill)
    assert len(calls) == 2, "the second node recomputed instead of downloading"
    assert sorted(p.name for p in folder_b.iterdir()) == sorted(p.name for p in folder_a.iterdir())
    assert (folder_b / "000002.npy").read_bytes() == b"shard2"
    assert b.hits["disk"] == 2 and b.hits["computed"] == 0


def test_artifact_cache_on_a_path_uses_no_flock(tmp_path, monkeypatch):
    import fcntl

    from bench.harness.artifacts import ArtifactCache

    monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(AssertionError("flock called")))
    c = ArtifactCache(tmp_path)
    assert c.get("k", {"a": 1}, lambda: torch.ones(2)).sum() == 2
    assert ArtifactCache(tmp_path).get("k", {"a": 1}, lambda: torch.zeros(2)).sum() == 2  # from disk
    assert not list((tmp_path / "k").glob(".*.lease"))  # the lock is gone once released


def test_results_store_on_an_object_store_round_trips(tmp_path):
    from bench.harness.store import done_keys, empty_row, read_runs, read_store_file, write_row
    from bench.harness.worker import write_result

    root = f"memory://eda-test-{os.getpid()}-{time.time_ns()}/runs"
    assert read_runs(root).empty  # nothing there yet: an empty frame, not an error
    row = empty_row()
    row.update(grid="g", model="m", method="eda-dm:tdac-only", bits="W4A8", seed=0, cell_key="k1", status="ok",
               time=__import__("pandas").Timestamp.now(tz="UTC"), fid=12.5)
    path = write_row(root, row)
    assert path.startswith(root) and "method=eda-dm%3Atdac-only" in path
    df = read_runs(root, "g")
    assert len(df) == 1 and df.method[0] == "eda-dm:tdac-only" and df.fid[0] == 12.5
    assert done_keys(root, "g") == {"k1"}
    from bench.harness.grid import Cell

    cell = Cell(grid="g", model="m", method="rtn", bits="W8A8", seed=1, samples=4, batch_size=4)
    row2 = {**row, "method": "rtn", "bits": "W8A8", "seed": 1, "cell_key": cell.key}
    write_result(tmp_path / "out", cell, {"row": row2, "png": b"\x89PNG..", "log": "hello\n"}, 1,
                 storage=root.rsplit("/runs", 1)[0])
    df = read_runs(root, "g")
    got = df[df.cell_key == cell.key].iloc[0]
    assert read_store_file(root, got.sample_grid) == b"\x89PNG.."
    assert (tmp_path / "out" / "logs" / "g" / "m" / "rtn").is_dir()  # logs stay with the driver's --out


def test_bench_run_with_storage_writes_and_resumes_there(tmp_path):
    """`bench.run --storage URI`: rows (and the report's input) under the URI, logs under --out, and a rerun
    resumes from the rows stored there."""
    from bench.harness.store import read_runs
    from bench.report import main as report_main
    from tests.test_run import run, write_grid

    storage = f"file://{tmp_path}/shared"
    grid = write_grid(tmp_path, ["rtn"], bits=("W8A8",), metrics=())
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out), "--storage", storage) == 0
    rows = read_runs(f"{storage}/runs", "t")
    assert len(rows) == 1 and (rows.status == "ok").all()
    assert not (out / "runs").exists() and (out / "logs" / "t").is_dir()
    assert (tmp_path / "shared" / "cache").is_dir()  # the FP artifact cache went there too
    assert run("--grid", grid, "--out", str(out), "--storage", storage) == 0  # resumed: nothing to run
    assert len(read_runs(f"{storage}/runs", "t", latest=False)) == 1
    assert report_main(["--out", str(tmp_path / "rep"), "--storage", storage, "--no-plots", "--allow-mixed"]) == 0
    assert "## grid `t`" in (tmp_path / "rep" / "report.md").read_text()
