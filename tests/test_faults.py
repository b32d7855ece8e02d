"""Fault injection for the harness: a driver killed mid-grid, a cell out of memory, a full disk, the
Ray dashboard port, reference data missing before sampling.

A worker process killed by the OS (segfault, the kernel's OOM killer: the actor dies mid-cell) is covered by
tests/test_run.py::test_crash_retry_failure_and_shared_artifacts (test-crash: the actor is restarted and the cell
re-run; test-abort: dies every time, recorded as failed after --retries).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.errors import BenchError
from bench.harness.store import partition_dir, read_runs, remove_stale_temps, write_row
from tests.conftest_ray import REPO, ray_session  # noqa: F401 - the session-wide Ray cluster
from tests.test_run import run
from tests.test_run import write_grid as _write_grid
from tests.test_store import make_row

PLUGINS = ["tests.harness_plugin", "tests.fault_plugin"]


def write_grid(tmp_path, methods, bits=("W8A8",), extra="", metrics=()):
    return _write_grid(tmp_path, methods, bits, extra=extra, plugins=PLUGINS, metrics=metrics)


def temps(root) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs if f.startswith(".tmp")]


def parquet_files(out) -> list[Path]:
    return [p for p in (Path(out) / "runs").rglob("*.parquet") if not p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------
# a writer killed mid-write: its dotfile temp is never read and the next driver reclaims it


def test_stale_temp_is_never_read_and_is_removed(tmp_path):
    final = write_row(tmp_path, make_row("a"))
    old = final.parent / ".tmp-0123abcd.parquet"
    old.write_bytes(final.read_bytes()[:60])  # truncated: what a SIGKILL mid-write leaves
    png = final.parent / "_samples" / ".tmp-W8A8-seed0-k.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG")
    young = final.parent / ".tmp-live-writer.parquet"
    young.write_bytes(b"PAR1")
    hour_ago = time.time() - 3600
    for p in (old, png):
        os.utime(p, (hour_ago, hour_ago))
    assert list(read_runs(tmp_path)["cell_key"]) == ["a"]
    assert sorted(remove_stale_temps(tmp_path)) == sorted([old, png])
    assert temps(tmp_path) == [young]  # a temp younger than STALE_TEMP_SECONDS may belong to a live writer
    assert remove_stale_temps(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------------------------
# disk full


def _full_disk(monkeypatch, after: int = 0):
    """Parquet writes fail with ENOSPC after `after` successful ones, having written part of the file first."""
    real, calls = pq.write_table, {"n": 0}

    def write_table(table, where, *a, **k):
        calls["n"] += 1
        if calls["n"] <= after:
            return real(table, where, *a, **k)
        Path(where).write_bytes(b"PAR1\x15\x04")  # a few bytes made it to disk
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", write_table)
    return calls


def test_disk_full_write_leaves_no_partial_file(tmp_path, monkeypatch):
    write_row(tmp_path, make_row("a"))
    _full_disk(monkeypatch)
    with pytest.raises(BenchError) as e:
        write_row(tmp_path, make_row("b"))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("disk full while writing ") and "No space left on device" in msg
    assert "free space or pass --out elsewhere" in msg and "b-" in msg  # names the file it was writing
    assert temps(tmp_path) == []
    assert list(read_runs(tmp_path)["cell_key"]) == ["a"]
    # any other write error is not dressed up as a full disk
    monkeypatch.setattr(pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no")))
    with pytest.raises(PermissionError):
        write_row(tmp_path, make_row("c"))
    assert temps(tmp_path) == []


def test_disk_full_mid_grid_stops_then_resumes(ray_session, tmp_path, monkeypatch, capsys):  # noqa: F811
    grid = write_grid(tmp_path, ["fp", "test-ok"], bits=("W8A8", "W4A8"))
    out = tmp_path / "out"
    calls = _full_disk(monkeypatch, after=1)  # the first finished cell is stored, the second hits the full disk
    assert run("--grid", grid, "--out", str(out), "--max-workers", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: disk full while writing ") and "--out elsewhere" in err
    assert calls["n"] == 2  # the driver stopped at the first failed write instead of computing the rest for nothing
    first = read_runs(out / "runs")
    assert len(first) == 1 and (first["status"] == "ok").all()
    assert temps(out / "runs") == []
    # a temp a killed writer left long ago: the next driver reclaims it
    stale = partition_dir(out / "runs", "t", "test-tiny", "fp") / ".tmp-killed.parquet"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"PAR1")
    os.utime(stale, (time.time() - 3600,) * 2)
    monkeypatch.undo()  # space freed: the same command resumes and completes the remaining cells
    assert run("--grid", grid, "--out", str(out), "--max-workers", "1") == 0
    df = read_runs(out / "runs", latest=False)
    assert len(df) == 3 and df["cell_key"].nunique() == 3 and (df["status"] == "ok").all()
    kept = df[df["cell_key"] == first["cell_key"][0]]
    assert list(kept["run_id"]) == [first["run_id"][0]]  # the stored cell was not rerun
    assert len(parquet_files(out)) == 3 and temps(out / "runs") == []


# ---------------------------------------------------------------------------------------------------------------
# out of memory


def test_oom_errors_are_one_line_with_the_fix():
    import torch

    from bench.harness.cell import format_error

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf reserved but unallocated ...")
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")
    for e, name in [(MemoryError(), "MemoryError"), (cuda, "OutOfMemoryError"), (cpu, "RuntimeError")]:
        line = format_error(e)
        assert len(line.splitlines()) == 1 and line.startswith(f"out of memory in this cell ({name}")
        assert "batch_size" in line and "--gpus-per-worker" in line and len(line) < 500
    disk = format_error(OSError(errno.ENOSPC, "No space left on device"))
    assert disk.startswith("disk full on the worker") and "EDA_BENCH_CACHE" in disk
    assert format_error(ValueError("bad\nvalue")) == "ValueError: bad"


def test_a_worker_killed_for_memory_says_so():
    """A process killed by the kernel's OOM killer or Ray's memory monitor leaves no Python error; its failed row
    still names memory as the likely cause and the fix (the grid-level path is test_run's test-abort cell)."""
    from bench.harness.worker import crash_message

    killed = crash_message(2, RuntimeError("worker exited unexpectedly"))
    monitor = crash_message(1, RuntimeError("Task was killed due to the node running low on memory. Memory on ..."))
    for line in (killed, monitor):
        assert len(line.splitlines()) == 1 and "batch_size" in line and "--max-workers" in line
    assert killed.startswith("worker crashed 2 times") and "out-of-memory killer" in killed
    assert monitor.startswith("worker crashed 1 times") and "killed for memory by Ray's memory monitor" in monitor


def test_oom_cell_fails_alone_and_the_worker_keeps_serving(ray_session, tmp_path):  # noqa: F811
    # one worker: the cells after the out-of-memory ones run on the same actor
    grid = write_grid(tmp_path, ["test-oom", "test-oom-cuda", "test-ok", "fp"])
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out), "--max-workers", "1") == 1  # failed cells -> exit status 1
    df = read_runs(out / "runs").set_index("method")
    assert len(df) == 4 and (df["attempts"] == 1).all()  # recorded, not a crash and a retry
    for method, name in [("test-oom", "MemoryError"), ("test-oom-cuda", "OutOfMemoryError")]:
        err = df.loc[method, "error"]
        assert df.loc[method, "status"] == "failed" and len(err.splitlines()) == 1
        assert err.startswith(f"out of memory in this cell ({name}") and "lower batch_size in the grid" in err
    assert (df.loc[["test-ok", "fp"], "status"] == "ok").all()
    pids = {re.search(r" on pid (\d+)", p.read_text()).group(1) for p in (out / "logs").rglob("*.log")}
    assert len(pids) == 1  # every cell ran on the one actor: it survived both out-of-memory cells


# ---------------------------------------------------------------------------------------------------------------
# reference data checked before sampling


def test_reference_available_reads_no_images(tmp_path, monkeypatch):
    from bench.metrics.reference import reference_available

    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    ok, why = reference_available("nodata", metrics=("fid", "kid"))
    assert not ok and len(why.splitlines()) == 1
    assert why.startswith("no reference images for nodata (split 'train')") and "EDA_BENCH_DATA" in why
    assert reference_available("nodata", metrics=("digits_fid",)) == (True, "")  # NaN for other datasets
    assert reference_available("digits", metrics=("fid", "digits_fid", "digits_cov")) == (True, "")
    # cached statistics of another resolution count when the resolution is not known yet
    stats = tmp_path / "cache" / "stats"
    stats.mkdir(parents=True)
    (stats / "nodata_train_fid-helper_32.npz").write_bytes(b"")
    assert reference_available("nodata", metrics=("fid",))[0]
    assert not reference_available("nodata", metrics=("fid",), res=16)[0]
    assert not reference_available("nodata", split="val", metrics=("fid",))[0]
    assert not reference_available("nodat", metrics=("fid",))[0]
    # one image file in the split folder is enough (it is not read)
    folder = tmp_path / "data" / "other" / "train" / "class0"
    folder.mkdir(parents=True)
    (folder / "x.png").write_bytes(b"not even an image")
    assert reference_available("other", metrics=("fid",)) == (True, "")
    assert not reference_available("other", metrics=("fid",), reference_dir=tmp_path / "empty")[0]


def test_missing_reference_fails_before_sampling(tmp_path, monkeypatch):
    import torch

    from bench.harness.artifacts import ArtifactCache
    from bench.harness.cell import run_cell
    from bench.harness.grid import Cell
    from bench.models import DiffusionModel, load_model

    import eda.trajectories
    import tests.harness_plugin  # noqa: F401 - registers test-tiny and test-ok

    torch.set_num_threads(1)
    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    calls = []
    real_generate, real_record = DiffusionModel.generate, eda.trajectories.record_trajectories
    monkeypatch.setattr(DiffusionModel, "generate", lambda self, *a, **k: calls.append("generate")
                        or real_generate(self, *a, **k))
    monkeypatch.setattr(eda.trajectories, "record_trajectories", lambda *a, **k: calls.append("record")
                        or real_record(*a, **k))
    model = dataclasses.replace(load_model("test-tiny"), dataset="nodata")
    cache = ArtifactCache(tmp_path / "artifacts")
    for method, bits in [("fp", "FP"), ("test-ok", "W8A8")]:
        cell = Cell(grid="t", model="test-tiny", method=method, bits=bits, seed=0, samples=4, metrics=("fid",),
                    batch_size=4)
        t0 = time.time()
        with pytest.raises(BenchError, match="no reference images for nodata"):
            run_cell(model, cell, cache, [("test-ok", {})], {"run_id": "r"})
        assert calls == [] and time.time() - t0 < 10
    # the counters do count: without Inception metrics the same cell samples
    cell = Cell(grid="t", model="test-tiny", method="test-ok", bits="W8A8", seed=0, samples=4, batch_size=4)
    row, _ = run_cell(model, cell, cache, [("test-ok", {})], {"run_id": "r"})
    assert row["status"] == "ok" and "generate" in calls and "record" in calls


def test_driver_fails_missing_reference_before_ray(tmp_path, monkeypatch):
    import bench.harness.driver
    import bench.harness.plan

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench.harness.plan, "model_reference", lambda name: ("nodata", None))  # as a zoo model would say
    monkeypatch.setattr(bench.harness.driver, "start_ray",
                        lambda address: pytest.fail("Ray started for cells that cannot run"))
    grid = write_grid(tmp_path, ["fp", "test-ok"], metrics=("fid", "fid_vs_fp"))
    out = tmp_path / "out"
    assert run("--grid", grid, "--out", str(out)) == 1
    df = read_runs(out / "runs")
    assert len(df) == 2 and (df["status"] == "failed").all() and (df["attempts"] == 0).all()
    assert df["error"].str.startswith("model test-tiny: no reference images for nodata").all()


# ---------------------------------------------------------------------------------------------------------------
# Ray's dashboard: a harness cluster serves nothing on 8265 (token authentication is left on)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(p))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def listening_ports() -> dict[int, int]:
    """socket inode -> TCP port of every listening socket (IPv4 and IPv6)."""
    out = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(f).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # TCP_LISTEN
                out[int(cols[9])] = int(cols[1].rsplit(":", 1)[1], 16)
    return out


def ports_of(pid: int, listening: dict[int, int]) -> set[int]:
    ports = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ports
    for fd in fds:
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m and int(m.group(1)) in listening:
            ports.add(listening[int(m.group(1))])
    return ports


CLUSTER = """
import os, sys
from bench.harness.driver import start_ray
assert start_ray(None)
print(os.getpid(), flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_harness_cluster_serves_no_dashboard(tmp_path):
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        pid = int(p.stdout.readline())
        procs = [pid, *descendants(pid)]
        listening = listening_ports()
        ports = {q: ports_of(q, listening) for q in procs}
        assert any("gcs_server" in (cmdline(q) or "") for q in procs)  # we are looking at the cluster it started
        assert not any(8265 in v for v in ports.values()), {cmdline(q): v for q, v in ports.items() if v}
        # Ray still starts dashboard.py, as a minimal head (usage stats only) that must serve no HTTP at all
        heads = [q for q in procs if "dashboard/dashboard.py" in (cmdline(q) or "")]
        for q in heads:
            assert "--disable-frontend" in cmdline(q) and ports[q] == set(), cmdline(q)
    finally:
        p.stdin.close()
        p.wait(timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# the driver SIGKILLed mid-grid, then the same command again


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_driver_killed_mid_grid_then_resumed(tmp_path):
    release = tmp_path / "release"
    extra = f'[method."test-wait"]\nrelease = "{release}"\n'
    grid = write_grid(tmp_path, ["fp", "test-ok", "test-wait"], extra=extra)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.run", "--grid", grid, "--out", str(out), "--no-progress", "--max-workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log1 = (tmp_path / "run1.log").open("w")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while len(parquet_files(out)) < 2:  # fp and test-ok are stored; test-wait blocks in its worker
            assert first.poll() is None, (tmp_path / "run1.log").read_text()[-2000:]
            assert time.time() < deadline, "the first run never stored two cells"
            time.sleep(0.2)
        time.sleep(1.0)
        tree = {q: cmdline(q) for q in descendants(first.pid)}
        assert any("CellWorker" in (c or "") for c in tree.values())  # the blocked cell is running
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stored = read_runs(out / "runs")
    assert len(stored) == 2 and (stored["status"] == "ok").all()
    run_id = stored["run_id"][0]
    # what a driver killed in the middle of a write leaves: a truncated dotfile temp (readers skip it)
    part = partition_dir(out / "runs", "t", "test-tiny", "test-ok")
    stale = part / ".tmp-killed.parquet"
    stale.write_bytes(next(part.glob("*.parquet")).read_bytes()[:100])
    os.utime(stale, (time.time() - 3600,) * 2)
    assert len(read_runs(out / "runs")) == 2

    # the same command again, at once: not blocked by what is left of the first cluster
    release.touch()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "1 ok, 0 failed" in again.stdout
    df = read_runs(out / "runs", latest=False)
    assert len(df) == 3 and df["cell_key"].nunique() == 3 and (df["status"] == "ok").all()  # each cell once
    assert (df["run_id"] == run_id).sum() == 2  # the first run's cells were skipped, not rerun
    assert df.loc[df["run_id"] != run_id, "method"].tolist() == ["test-wait"]
    assert not stale.exists() and temps(out / "runs") == []
    for p in parquet_files(out):
        assert pq.read_table(p).num_rows == 1  # every visible file is a whole Parquet file

    # everything the killed driver started dies on its own: the head processes with it (Linux parent-death
    # signal), the actor once its raylet is gone (~2 s), Ray's two agents after a 60 s GCS timeout
    deadline = time.time() + 150
    while [q for q in tree if alive(q)] and time.time() < deadline:
        time.sleep(1)
    left = {q: tree[q] for q in tree if alive(q) and cmdline(q) == tree[q]}
    assert not left, left


def test_driver_checks_the_zoo_split(tmp_path, monkeypatch):
    """Stable Diffusion's FID reference is COCO val2014 (its zoo card): images under coco/train do not count."""
    from PIL import Image

    from bench.harness.grid import Cell
    from bench.harness.plan import reference_status

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data" / "coco" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "coco" / "train" / "a.png")
    cell = Cell("g", "sd-v1-4", "fp", "FP", 0, 8, metrics=("fid",))
    ok, why = reference_status(cell)
    assert not ok and "split 'val2014'" in why and str(tmp_path / "data" / "coco" / "val2014") in why
    (tmp_path / "data" / "coco" / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "coco" / "val2014" / "a.png")
    assert reference_status(cell) == (True, "")


# ---------------------------------------------------------------------------------------------------------------
# a worker the driver lost contact with, which then finished its cell: the result is handed over, not recomputed


def _handoff_result(png=b"\x89PNG fake"):
    import numpy as np

    row = make_row(method="test-ok", fid=12.5)
    row.update(eps_mse_per_step=np.array([0.1, 0.2]), allocation=np.array([3, 1]))
    return {"row": row, "png": png, "log": "line one\nline two\n", "load_error": False}


def test_handoff_round_trip_stores_the_same_row(tmp_path):
    from bench.harness import handoff

    result = _handoff_result()
    path = handoff.path_for(tmp_path / "cache", "run-1", result["row"]["cell_key"])
    handoff.save(path, result)
    assert temps(tmp_path) == [] and path.is_file()
    got = handoff.take(path)
    assert not path.exists()  # taken once
    assert got["png"] == result["png"] and got["log"] == result["log"] and got["load_error"] is False
    # written to the store, the handed-over row is the row itself
    a, b = write_row(tmp_path / "a", result["row"]), write_row(tmp_path / "b", got["row"])
    import pandas as pd

    pd.testing.assert_frame_equal(pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas())  # NaN equals NaN
    assert handoff.take(path) is None
    path.write_bytes(b"not parquet")  # a corrupt handoff is ignored (the cell runs again) and removed
    assert handoff.take(path) is None and not path.exists()


def test_handoff_prune_keeps_this_run_and_recent_ones(tmp_path):
    from bench.harness import handoff

    for run_id in ("old", "recent", "this"):
        handoff.save(handoff.path_for(tmp_path, run_id, "k"), _handoff_result())
    old = tmp_path / handoff.DIR / "old"
    os.utime(old, (time.time() - handoff.KEEP_S - 60,) * 2)
    this = tmp_path / handoff.DIR / "this"
    os.utime(this, (time.time() - handoff.KEEP_S - 60,) * 2)
    handoff.prune(tmp_path, "this")
    assert not old.exists() and this.exists() and (tmp_path / handoff.DIR / "recent").exists()


def test_worker_hands_a_finished_result_to_the_next_attempt(ray_session, tmp_path):  # noqa: F811
    """The same cell of the same run, asked again of a worker (what the driver does after ActorUnavailableError):
    the finished result comes back without running the method again; another run recomputes; only the latest
    result is kept."""
    import ray

    from bench.harness.artifacts import cache_root
    from bench.harness.grid import load_grid
    from bench.harness.worker import CellWorker

    count = tmp_path / "count"
    extra = f'[method."test-stall"]\ncount = "{count}"\n'  # no marker: it never stalls, it counts
    cells = load_grid(write_grid(tmp_path, ["test-stall", "test-ok"], extra=extra)).cells()
    stall, ok = (next(c for c in cells if c.method == m) for m in ("test-stall", "test-ok"))
    cache = cache_root(tmp_path / "out")
    actor = CellWorker.options(num_cpus=1).remote(1, PLUGINS)
    context = {"run_id": "run-1", "git_commit": "x"}

    def call(cell, ctx):
        return ray.get(actor.run.remote(cell.to_dict(), [], ctx, cache))

    first = call(stall, context)
    assert first["row"]["status"] == "ok" and count.read_text().count("quantized") == 1
    again = call(stall, context)
    assert count.read_text().count("quantized") == 1  # not quantized again
    assert again["row"]["eps_mse"] == first["row"]["eps_mse"] and again["png"] == first["png"]
    assert again["log"].startswith(first["log"]) and "is handed over instead of running the cell again" in again["log"]
    call(stall, {**context, "run_id": "run-2"})  # another run: computed afresh
    assert count.read_text().count("quantized") == 2
    call(ok, {**context, "run_id": "run-2"})
    kept = sorted(p.relative_to(Path(cache) / "handoff").as_posix() for p in (Path(cache) / "handoff").rglob("*.parquet"))
    assert kept == [f"run-2/{ok.key}.parquet"]  # the latest result only
    ray.kill(actor)


@pytest.mark.slow
def test_lost_contact_with_a_worker_hands_its_result_over(tmp_path):
    """A worker paused for 20 s (SIGSTOP; a stalled node or a network partition looks the same to the driver) with
    short gRPC keepalives: Ray raises ActorUnavailableError on the driver, which re-queues the cell, while the paused
    worker resumes and finishes it. The re-queued attempt gets the finished result: the method ran once."""
    marker, count = tmp_path / "stalled", tmp_path / "count"
    extra = f'[method."test-stall"]\nmarker = "{marker}"\ncount = "{count}"\nstall_s = 20\n'
    grid = write_grid(tmp_path, ["test-stall", "fp"], bits=("W8A8",), extra=extra)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "RAY_grpc_client_keepalive_time_ms": "2000", "RAY_grpc_client_keepalive_timeout_ms": "2000"}
    done = subprocess.run([sys.executable, "-m", "bench.run", "--grid", grid, "--out", str(out), "--no-progress",
                           "--max-workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    df = read_runs(out / "runs").set_index("method")
    assert df.loc["test-stall", "attempts"] == 2, "the pause did not make the driver lose the worker"
    assert count.read_text().count("quantized") == 1  # handed over, not quantized again
    assert "is handed over instead of running the cell again" in done.stdout
    assert "0 worker crash(es), 1 cell(s) re-queued after losing contact with their worker" in done.stdout
    assert (df["status"] == "ok").all()
