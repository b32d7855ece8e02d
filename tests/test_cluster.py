"""Which Ray cluster bench.run joins and what its workers get (bench.harness.cluster): pure functions, no cluster."""

import json

import pytest

from bench.errors import BenchError, UsageError
from bench.harness.cluster import (JOB_CONFIG_VAR, PACKAGES, REPO, Target, build_runtime_env, parse_runtime_env_json,
                                   resolve_address)


@pytest.mark.parametrize("arg, environ, want", [
    (None, {}, Target("local", "local")),  # a laptop: a fresh local cluster, as before
    ("auto", {}, Target("auto", "--address")),
    ("ray://head:10001", {"RAY_ADDRESS": "10.0.0.1:6379"}, Target("ray://head:10001", "--address")),  # the flag wins
    (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, Target("10.0.0.1:6379", "RAY_ADDRESS")),
    (None, {"RAY_ADDRESS": ""}, Target("local", "local")),  # set but empty: as if unset
    (None, {JOB_CONFIG_VAR: "{}"}, Target("auto", "ray job")),
    (None, {"RAY_ADDRESS": "127.0.0.1:6379", JOB_CONFIG_VAR: "{}"}, Target("127.0.0.1:6379", "RAY_ADDRESS")),
])
def test_resolve_address(arg, environ, want):
    assert resolve_address(arg, environ) == want
    assert want.local == (want.source == "local")


ENV = {"EDA_BENCH_MODELS": "/m", "EDA_BENCH_CACHE": "/c", "HF_HOME": "/hf", "HF_HUB_OFFLINE": "1", "PATH": "/bin",
       "HOME": "/root", "RAY_ADDRESS": "auto"}
SETTINGS = {k: v for k, v in ENV.items() if k.startswith("EDA_BENCH_") or k.startswith("HF_")}


def test_local_default_ships_settings_but_no_code():
    renv = build_runtime_env(Target("local", "local"), ENV)
    assert renv == {"env_vars": SETTINGS}  # workers of a local cluster run from this checkout
    assert build_runtime_env(Target("local", "local"), {"PATH": "/bin"}) == {}  # nothing to pass: no runtime_env


def test_attached_cluster_gets_settings_and_the_packages():
    renv = build_runtime_env(Target("ray://h:10001", "--address"), ENV)
    assert renv["env_vars"] == SETTINGS  # never PATH, HOME or RAY_ADDRESS: those belong to each node
    assert renv["py_modules"] == [str(REPO / p) for p in PACKAGES]
    assert set(PACKAGES) == {"eda", "baselines", "bench"}
    for p in renv["py_modules"]:
        assert (REPO / p / "__init__.py").is_file()  # importable packages, as Ray's py_modules needs


def test_runtime_env_json_merges_over_ours():
    extra = parse_runtime_env_json('{"env_vars": {"X": 1, "HF_HOME": "/other"}, "pip": ["diffusers"], '
                                   '"py_modules": null}')
    renv = build_runtime_env(Target("auto", "--address"), ENV, extra)
    assert renv["env_vars"] == {**SETTINGS, "X": "1", "HF_HOME": "/other"}  # added to ours; values as strings
    assert renv["pip"] == ["diffusers"] and "py_modules" not in renv  # null removes our key
    assert parse_runtime_env_json(None) == {} and parse_runtime_env_json("") == {}
    # py_modules are added to ours: a plugin package travels with the project's
    renv = build_runtime_env(Target("auto", "--address"), ENV, {"py_modules": ["/src/myplugin"], "env_vars": None})
    assert renv["py_modules"] == [str(REPO / p) for p in PACKAGES] + ["/src/myplugin"]
    assert "env_vars" not in renv  # null removes ours, as for any key


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"env_vars": [1]}'])
def test_bad_runtime_env_json_is_one_usage_line(text):
    with pytest.raises(UsageError, match="--runtime-env-json") as e:
        parse_runtime_env_json(text)
    assert "\n" not in str(e.value)


def job_environ(runtime_env):
    return {**ENV, JOB_CONFIG_VAR: json.dumps({"runtime_env": runtime_env, "metadata": {}})}


def test_inside_a_ray_job_the_job_settings_win():
    """Ray refuses to merge a job's runtime_env with the driver's on a shared key or variable: ours yield."""
    target = Target("auto", "ray job")
    # `ray job submit --working-dir .` already ships the code: no second copy; its own variables are left alone
    renv = build_runtime_env(target, job_environ({"working_dir": "gcs://x.zip", "env_vars": {"HF_HOME": "/job"}}))
    assert "py_modules" not in renv and "working_dir" not in renv
    assert renv["env_vars"] == {k: v for k, v in SETTINGS.items() if k != "HF_HOME"}
    # a job with only pip packages: we still ship the code, but never the pip key twice
    renv = build_runtime_env(target, job_environ({"pip": ["x"]}), {"pip": ["y"]})
    assert "pip" not in renv and len(renv["py_modules"]) == 3
    # Ray's variable unreadable: treated as no job runtime_env
    assert "py_modules" in build_runtime_env(target, {JOB_CONFIG_VAR: "{bad"})


class FakeRay:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def is_initialized(self):
        return False

    def init(self, **kw):
        self.calls.append(kw)
        if self.fail:
            raise ConnectionError("Could not find any running Ray instance.\nmore")


def test_start_ray_local_default_unchanged(monkeypatch):
    import sys

    from bench.harness.driver import start_ray

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    for k in ("RAY_ADDRESS", JOB_CONFIG_VAR, "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("EDA_BENCH_MODELS", "/m")
    assert start_ray(None) is True
    (kw,) = fake.calls
    assert kw["address"] == "local" and kw["include_dashboard"] is False and kw["log_to_driver"] is False
    assert "py_modules" not in kw["runtime_env"] and kw["runtime_env"]["env_vars"]["EDA_BENCH_MODELS"] == "/m"

    # RAY_ADDRESS (as `ray job submit` sets it) is joined, with the code shipped
    fake.calls.clear()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    start_ray(None)
    (kw,) = fake.calls
    assert kw["address"] == "10.0.0.1:6379" and len(kw["runtime_env"]["py_modules"]) == 3


def test_start_ray_unreachable_cluster_is_one_line(monkeypatch):
    import sys

    from bench.harness.driver import start_ray

    monkeypatch.setitem(sys.modules, "ray", FakeRay(fail=True))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(BenchError, match=r"could not join the Ray cluster at '10.0.0.1:6379' \(from RAY_ADDRESS: "
                                         r"Could not find any running Ray instance.\); .* unset RAY_ADDRESS") as e:
        start_ray(None)
    assert "\n" not in str(e.value)
    with pytest.raises(BenchError, match="drop --address"):
        start_ray("ray://nowhere:10001")


HEAD = """
import ray, sys
from ray._raylet import AuthenticationMode, get_authentication_mode
ray.init(address="local", num_cpus=1, include_dashboard=False)
token = get_authentication_mode() == AuthenticationMode.TOKEN
print(ray.get_runtime_context().gcs_address, "token" if token else "", flush=True)
sys.stdin.readline()
"""


def test_bench_run_joins_a_running_cluster_and_ships_the_code(tmp_path):
    """A cluster started elsewhere, whose workers have neither this checkout on their path nor our settings: bench.run
    joins it through RAY_ADDRESS, and the workers import eda/bench from the shipped py_modules and see EDA_BENCH_*."""
    import os
    import subprocess
    import sys

    from bench.harness.store import read_runs
    from tests.test_run import write_grid

    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS") and
             not k.startswith("EDA_BENCH_")}
    head = subprocess.Popen([sys.executable, "-c", HEAD], cwd=tmp_path, env={**clean, "OMP_NUM_THREADS": "1"},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address, _, auth = head.stdout.readline().strip().partition(" ")
        assert address, "the head process did not start a cluster"
        grid = write_grid(tmp_path, ["test-where"], bits=("W8A8",))
        out = tmp_path / "out"
        env = {**clean, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO), "EDA_BENCH_PROBE": "from-the-driver"}
        if auth == "token":  # a client joins a token-authenticated cluster only when told to (README)
            env["RAY_AUTH_MODE"] = "token"
        rc = subprocess.run([sys.executable, "-m", "bench.run", "--grid", grid, "--out", str(out), "--no-progress",
                             "--runtime-env-json", json.dumps({"py_modules": [str(REPO / "tests")]})],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert rc.returncode == 0, rc.stderr[-3000:]
        assert "[test-tiny/test-where/W8A8/seed0]" in rc.stdout  # live lines from the joined cluster's worker
    finally:
        head.stdin.close()
        head.wait(timeout=120)
    row = read_runs(out / "runs").iloc[0]
    info = json.loads(row["info"])
    assert row["status"] == "ok" and info["probe"] == "from-the-driver"
    # imported from Ray's unpacked py_modules, not from this checkout nor an installed eda-bench
    assert all("py_modules_files" in f and not f.startswith(str(REPO)) for f in info["code"]), info["code"]
    assert row["node_id"] and row["host"]


CLUSTER = """
import sys
from ray.cluster_utils import Cluster
from ray._raylet import AuthenticationMode, get_authentication_mode

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
# two worker nodes, one actor slot each; the second lacks test-picky's weights (tests/harness_plugin.py)
workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1, env_vars={"TEST_PICKY_MISSING": "1"})]
cluster.wait_for_nodes()
token = get_authentication_mode() == AuthenticationMode.TOKEN
print(cluster.address, "token" if token else "", *(w.node_id for w in workers), flush=True)
for line in sys.stdin:
    if line.strip() == "kill":
        cluster.remove_node(workers[1], allow_graceful=False)  # a node lost mid-grid: its raylet and workers die
        print("killed", workers[1].node_id, flush=True)
cluster.shutdown()
"""


def test_multi_node_cluster_spreads_cells_and_survives_a_lost_node(tmp_path):
    """A real three-node Ray cluster (ray.cluster_utils.Cluster: a head without CPUs and two one-slot worker nodes)
    joined through RAY_ADDRESS: a grid's rows come from both worker nodes; a model whose weights one node lacks
    runs only on the other; a worker node killed mid-grid loses no finished cell, and the grid completes on the
    remaining node."""
    import os
    import subprocess
    import sys
    import time

    from bench.harness.store import read_runs
    from tests.test_run import write_grid

    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS") and
             not k.startswith("EDA_BENCH_")}
    env0 = {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    head = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=tmp_path, env=env0, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address, *rest = head.stdout.readline().split()
        auth, (has_picky, lacks_picky) = ("token" if rest[0] == "token" else ""), rest[-2:]
        env = {**env0, "RAY_ADDRESS": address}
        if auth == "token":
            env["RAY_AUTH_MODE"] = "token"
        cmd = [sys.executable, "-m", "bench.run", "--out", str(tmp_path / "out"), "--no-progress",
               "--runtime-env-json", json.dumps({"py_modules": [str(REPO / "tests")]})]
        # 0) the dry run asks every node what it has
        (tmp_path / "a").mkdir()
        grid_a = write_grid(tmp_path / "a", ["test-ok"], bits=("W8A8", "W4A8"), seeds=(0, 1), metrics=())
        dry = subprocess.run([*cmd, "--grid", grid_a, "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert dry.returncode == 0, dry.stderr[-3000:]
        nodes = dry.stdout.split("nodes (each checked where its cells would run):")[1].strip().splitlines()
        assert len(nodes) == 3 and all(ln.endswith("available test-tiny") for ln in nodes), dry.stdout
        assert "[available: on 3 of 3 node(s)" in dry.stdout
        assert "on the cluster: 2 actor(s) x (num_cpus=1, num_gpus=0)" in dry.stdout  # its CPUs, not the driver's
        # 1) both worker nodes run cells
        rc = subprocess.run([*cmd, "--grid", grid_a], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
        assert rc.returncode == 0, rc.stderr[-3000:]
        rows_a = read_runs(tmp_path / "out" / "runs", grid="t")
        assert len(rows_a) == 4 and (rows_a.status == "ok").all()
        assert rows_a.node_id.nunique() == 2, rows_a.node_id.tolist()
        # 1b) a model one worker node lacks: the dry run says so per node, and every cell runs on the other node
        (tmp_path / "p").mkdir()
        grid_p = write_grid(tmp_path / "p", ["test-ok"], bits=("W8A8", "W4A8"), seeds=(0, 1), metrics=())
        text = open(grid_p).read().replace('name = "test-tiny"', 'name = "test-picky"').replace('name = "t"',
                                                                                               'name = "tp"')
        open(grid_p, "w").write(text)
        dry = subprocess.run([*cmd, "--grid", grid_p, "--dry-run"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "[available: on 2 of 3 node(s)" in dry.stdout
        assert f"({lacks_picky[:8]}): available -; missing test-picky (weights missing on this node" in dry.stdout
        rc = subprocess.run([*cmd, "--grid", grid_p], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
        assert rc.returncode == 0, rc.stderr[-3000:]
        rows_p = read_runs(tmp_path / "out" / "runs", grid="tp")
        assert len(rows_p) == 4 and (rows_p.status == "ok").all()
        assert set(rows_p.node_id) == {has_picky}, rows_p.node_id.tolist()
        # 2) a worker node dies after the first cell of another grid has finished
        (tmp_path / "b").mkdir()
        grid_b = write_grid(tmp_path / "b", ["test-ok"], bits=("W8A8", "W6A6", "W4A8"), seeds=(2, 3, 4),
                            metrics=())
        text = open(grid_b).read().replace('name = "t"', 'name = "t2"')
        open(grid_b, "w").write(text)
        run_b = subprocess.Popen([*cmd, "--grid", grid_b], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        b_rows = tmp_path / "out" / "runs" / "grid=t2"

        def finished():  # rows in the store (a row is written to a dot-named temp file, then renamed)
            return {p.name for p in b_rows.rglob("*.parquet") if not p.name.startswith(".")}

        while not finished() and time.time() < deadline and run_b.poll() is None:
            time.sleep(0.2)
        finished_before = finished()
        assert finished_before and run_b.poll() is None, "the grid ended before a node could be killed"
        head.stdin.write("kill\n")
        head.stdin.flush()
        said, _, killed_node = head.stdout.readline().strip().partition(" ")
        assert said == "killed" and killed_node
        import pandas as pd

        killed_at = pd.Timestamp.now(tz="UTC")
        out, err = run_b.communicate(timeout=600)
        assert run_b.returncode == 0, err[-3000:]
    finally:
        head.stdin.close()
        head.wait(timeout=120)
    rows_b = read_runs(tmp_path / "out" / "runs", grid="t2")
    assert len(rows_b) == 9 and (rows_b.status == "ok").all()  # every cell, none lost or failed
    assert finished_before <= finished()  # finished cells kept as written
    done_at = pd.to_datetime(rows_b.time, utc=True)
    later = rows_b[done_at > killed_at]
    survivor = (set(rows_a.node_id) - {killed_node}).pop()
    assert killed_node in set(rows_a.node_id) and survivor in set(later.node_id)  # the survivor went on
    # a worker process may finish the cell it was on as its raylet dies; none finishes seconds later
    assert killed_node not in set(rows_b[done_at > killed_at + pd.Timedelta(seconds=5)].node_id)


def test_availability_merges_what_the_nodes_answer():
    from bench.harness.probe import merge_models, merge_refs, node_lines

    probes = [{"node_id": "aaaa1111", "host": "login", "models": {"m": [False, "weights missing"], "n": [False, "x"]},
               "refs": [[False, "no cifar10"]]},
              {"node_id": "bbbb2222", "host": "gpu1", "models": {"m": [True, "cached"], "n": [False, "not here"]},
               "refs": [[True, ""]]},
              {"node_id": "cccc3333", "host": "gpu2", "error": "no answer in 120s"}]
    status = merge_models(probes, ["m", "n"])
    assert status["m"] == (True, "on 1 of 3 node(s) (gpu1)")  # the login node's missing weights do not matter
    assert status["n"] == (False, "on none of the 3 node(s): x")
    assert merge_refs(probes, 1) == [(True, "on 1 of 3 node(s) (gpu1)")]
    lines = node_lines(probes, ["m", "n"])
    assert lines[0] == "  node gpu1 (bbbb2222): available m; missing n (not here)"
    assert lines[1] == "  node gpu2 (cccc3333): no answer in 120s"
    assert lines[2].startswith("  node login (aaaa1111): available -; missing m (weights missing)")
    assert merge_models([probes[2]], ["m"])["m"] == (False, "no node of the cluster answered the availability probe")


def _cell(model, seed=0, metrics=()):
    from bench.harness.grid import Cell

    return Cell(grid="t", model=model, method="rtn", bits="W8A8", seed=seed, samples=4, batch_size=4,
                metrics=metrics)


def test_pending_gives_an_actor_only_cells_its_node_may_run():
    from bench.harness.worker import Pending

    p = Pending()
    for c in (_cell("big", 0), _cell("big", 1), _cell("small", 0)):
        p.push(c)
    only_small = lambda c: c.model == "small"  # noqa: E731 - this node lacks "big"
    assert p.take("big", set(), only_small).model == "small"  # not the held model: its node cannot run it
    assert p.take(None, set(), only_small) is None and len(p) == 2
    got = p.take(None, set())
    assert (got.model, got.seed) == ("big", 0) and len(p) == 1  # no constraint: as before


def test_cells_whose_nodes_left_fail_with_a_line_and_others_wait():
    """Placement: a cell only node n1 may run, and only an actor on n2 left: recorded as failed with the reason, not
    waited for forever; while an actor is still being located, it waits."""
    from bench.harness.worker import Dispatcher, Slot

    results = []
    d = Dispatcher([Slot(actor=None, node="n2")], None, {}, {"run_id": "r"}, "/c",
                   lambda cell, result, attempts: results.append((cell, result)), 1, None,
                   placement={("big", ()): frozenset({"n1"}), ("small", ()): frozenset({"n1", "n2"})})
    d.pending.push(_cell("big"))
    d.inflight["ref"] = (Slot(actor=None), None)  # an actor not yet located: it may land on n1
    assert d._unplaceable() is False and len(d.pending) == 1
    del d.inflight["ref"]
    assert d._unplaceable() is True and len(d.pending) == 0
    (cell, result), = results
    assert result["row"]["status"] == "failed" and "no live node of the cluster has model big" in result["row"]["error"]
    assert d._fits(d.slots[0])(_cell("small")) and not d._fits(d.slots[0])(_cell("big"))
    assert d._fits(d.slots[0])(_cell("unprobed"))  # not in the placement: anywhere


def test_a_plugin_model_declares_where_its_weights_are(monkeypatch):
    """register_model(name, available=fn): the offline check the dry run, the driver and the node probes use."""
    import tests.harness_plugin  # noqa: F401 - registers test-picky
    from bench.harness.plan import model_status

    monkeypatch.delenv("TEST_PICKY_MISSING", raising=False)
    assert model_status("test-picky") == (True, "weights here")
    monkeypatch.setenv("TEST_PICKY_MISSING", "1")
    assert model_status("test-picky") == (False, "weights missing on this node (TEST_PICKY_MISSING)")
    assert model_status("test-tiny") == (True, "built in")  # no check declared: available wherever it is registered


def test_a_probed_dry_run_counts_the_clusters_cpus_and_gpus(monkeypatch):
    import sys
    import types

    from bench.harness.driver import cluster_totals

    fake = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 96.0, "GPU": 8.0, "memory": 1e12})
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert cluster_totals() == {"CPU": 96.0, "GPU": 8.0}  # the nodes' totals, not the driver machine's
    fake.cluster_resources = lambda: {"CPU": 4.0}
    assert cluster_totals() == {"CPU": 4.0, "GPU": 0.0}
