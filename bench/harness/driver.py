"""Running a planned grid (`python -m bench.run`): resume from the store, fail fast on models or reference data
that are not here, start Ray, hand the cells to the workers (bench.harness.worker) and store each result as it
arrives.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.errors import BenchError, UsageError
from bench.harness.grid import Grid
from bench.harness.plan import (local_resources, calibration_requests, check_methods, check_metrics, import_plugins,
                                model_status, plan, print_plan, reference_status, resource_groups, resources)
from bench.harness.provenance import git_commit


def seed_store(args, grid: Grid, cells, runs) -> set[str]:
    """--resume-from FILE: the finished cells of this grid in committed results files go into the store before
    planning, so the run does only the rest. A dry run writes nothing; it returns the keys it would import, so its
    plan shows what the real run would skip. Returns the cell keys found in the files."""
    files = getattr(args, "resume_from", None) or []
    if not files:
        return set()
    if not args.resume:
        raise UsageError("--resume-from seeds the store with finished cells to skip; it cannot go with --no-resume")
    from bench.harness.store import import_rows, importable_rows, read_file

    keys, found = {c.key for c in cells}, set()
    for f in files:
        rows = importable_rows(read_file(f), grid.name, keys)
        found |= set(rows["cell_key"])
        if args.dry_run:
            print(f"--resume-from {f}: {len(rows)} finished cell(s) of grid {grid.name} (dry run: not imported)")
        else:
            n = import_rows(runs, rows)
            print(f"--resume-from {f}: {len(rows)} finished cell(s) of grid {grid.name}, {n} imported into {runs} "
                  f"({len(rows) - n} already there)", flush=True)
    return found


def run_grid(args) -> int:
    """The whole of `python -m bench.run` after argument parsing: plan, check, then a dry run or the run itself."""
    grid = plan(args)
    from bench.harness.cluster import parse_runtime_env_json

    parse_runtime_env_json(getattr(args, "runtime_env_json", None))  # a typo fails now, not after planning
    import_plugins(grid.imports + args.imports)
    out = Path(args.out)
    store = storage_root(args)
    cells = grid.cells()
    from bench.harness.store import done_keys, runs_dir

    seeded = seed_store(args, grid, cells, runs_dir(store))
    done = (done_keys(runs_dir(store), grid.name) | seeded) if args.resume else set()
    todo = [c for c in cells if c.key not in done]
    check_methods(grid)
    check_metrics(grid)
    if getattr(args, "estimate", False) and not args.dry_run:
        raise UsageError("--estimate goes with --dry-run (it plans; it runs nothing)")
    status = {b["name"]: model_status(b["name"]) for b in grid.models}
    from bench.harness.cluster import resolve_address

    probes, ref_status, where, started = None, None, None, False
    try:
        if not resolve_address(args.address, os.environ).local and (todo or args.dry_run):
            # on a cluster, ask the nodes (the driver may be a login node without weights or data)
            started = start_ray(args.address, getattr(args, "runtime_env_json", None))
            status, probes, ref_status, where = probe_cluster(grid, todo, args)
        unknown = [m for m, (ok, why) in status.items() if not ok and "not registered" in why]
        if unknown:
            from bench.models.registry import available_models

            raise UsageError(f"unknown model(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(available_models())} or a local directory saved with save_pretrained")
        if args.dry_run:
            # a probed cluster's own CPUs and GPUs (all alive nodes), else this machine's
            here = local_resources() if probes is None else cluster_totals()
            print_plan(grid, cells, todo, status, resources(grid, args, here),
                       "Ray is not started by a dry run" if probes is None else "the cluster was only probed",
                       {m: resources(grid, args, here, m) for m in grid.model_names() if m in grid.model_resources},
                       scope="here" if probes is None else "on the cluster")
            if probes is not None:
                from bench.harness.probe import node_lines

                print("\nnodes (each checked where its cells would run):")
                print("\n".join(node_lines(probes, list(dict.fromkeys(grid.model_names())))))
            if getattr(args, "estimate", False):
                print_estimates(todo, status, {m: resources(grid, args, here, m)["cpus_per_worker"]
                                               for m in grid.model_names()})
            return 0
        if not todo:
            print(f"grid {grid.name}: all {len(cells)} cells are already in {runs_dir(store)}; use --no-resume to "
                  "rerun")
            return 0
        return execute_plan(grid, cells, todo, status, args, out, store, ref_status, where)
    finally:
        if started:
            import ray

            ray.shutdown()


def cluster_totals() -> dict:
    """CPU and GPU totals of the joined Ray cluster, in local_resources' form."""
    import ray

    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def storage_root(args) -> str | Path:
    """--storage (a path or URI every node reaches), else --out: where runs/ and cache/ are. A URI that cannot be
    opened is one usage line now, not a failure after the first cell."""
    text = getattr(args, "storage", None)
    if not text:
        return Path(args.out)
    from bench.harness.storage import open_storage

    st = open_storage(text)
    return text if not st.posix else Path(st.base)


def probe_cluster(grid: Grid, todo: list, args) -> tuple[dict, list, dict, dict]:
    """(model status, per-node probes, reference status per (model, metrics), the nodes that may run each
    (model, metrics)) from the nodes of the cluster."""
    from bench.harness.probe import merge_models, merge_refs, placement, probe_nodes

    reps: dict = {}
    for c in todo:
        reps.setdefault((c.model, c.metrics), c)
    models = list(dict.fromkeys(grid.model_names()))
    probes = probe_nodes(models, list(reps.values()), grid.imports + args.imports)
    return (merge_models(probes, models), probes, dict(zip(reps, merge_refs(probes, len(reps)))),
            placement(probes, list(reps)))



def print_estimates(todo: list, status: dict, threads: dict) -> None:
    """--dry-run --estimate: per available model, device-hours of its cells still to run (bench.harness.estimate)."""
    import torch

    from bench.harness.estimate import estimate_line, estimate_model
    from bench.models.registry import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nestimates (measured on {device}; an upper bound for budget = \"converged\"):")
    for name in dict.fromkeys(c.model for c in todo):
        ok, why = status[name]
        if not ok:
            print(f"model {name}: not available here, no estimate ({why})")
            continue
        cells = [c for c in todo if c.model == name]
        requests = [tuple(p) for ps in calibration_requests(cells).values() for p in ps]
        est = estimate_model(load_model(name), cells, requests, device, threads=int(threads.get(name, 1)))
        print(f"model {name}:\n" + estimate_line(name, est, device), flush=True)


def start_ray(address: str | None, runtime_env_json: str | None = None):
    """Join or start the cluster that bench.harness.cluster.resolve_address names, with the runtime_env it builds.
    Returns True when this call started Ray (the caller shuts it down), False when a session already holds it."""
    import ray

    from bench.harness.cluster import build_runtime_env, parse_runtime_env_json, resolve_address

    extra = parse_runtime_env_json(runtime_env_json)  # a usage error whether or not Ray is already up
    if ray.is_initialized():  # e.g. a test session already holds a cluster
        return False
    target = resolve_address(address, os.environ)
    renv = build_runtime_env(target, os.environ, extra) or None
    if not target.local:
        try:
            ray.init(address=target.address, runtime_env=renv, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            fix = {"--address": "drop --address", "RAY_ADDRESS": "unset RAY_ADDRESS"}.get(target.source,
                                                                                      "run outside the Ray job")
            raise BenchError(f"could not join the Ray cluster at {target.address!r} (from {target.source}: "
                             f"{str(e).splitlines()[0][:160]}); start one with `ray start --head`, or {fix} to run on "
                             "a local cluster") from None
    else:
        # Ray starts workers at nice 15; on a shared machine that starves the grid (and distorts its timings).
        # Ray's own job manager runs submitted jobs' workers at niceness 0 (dashboard/modules/job/job_manager.py).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env=renv)
    return True


def execute_plan(grid: Grid, cells, todo, status, args, out: Path, store: str | Path, ref_status: dict | None = None,
                 where: dict | None = None) -> int:
    """Run the cells still to do, storing rows under `store` (storage_root) and logs under `out`. `ref_status` ((model, metrics) -> (ok, why)), when a cluster was probed, replaces
    the driver's own reference-data check, and `where` ((model, metrics) -> node ids) keeps each cell on the nodes
    that have its model and reference data."""
    import ray

    from bench.harness.artifacts import cache_root
    from bench.harness.cell import failed_row
    from bench.harness.progress import GridProgress
    from bench.harness.worker import execute, write_result

    context = {"run_id": f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
               "git_commit": git_commit()}
    if getattr(args, "save_samples", False):  # the workers write them (on a cluster: --out on shared storage)
        context["samples_dir"] = str(Path(out).resolve() / "samples")
    t0 = time.time()
    progress = GridProgress(len(todo), f"grid {grid.name}", enabled=args.progress)
    counts = {"ok": 0, "failed": 0}

    def on_result(cell, result, attempts):
        write_result(out, cell, result, attempts, storage=str(store))

    # a driver killed mid-write (SIGKILL skips write_row's cleanup) leaves dotfile temps: never read, reclaimed here
    from bench.harness.store import remove_stale_temps, runs_dir

    remove_stale_temps(runs_dir(store))
    # fail fast, per model, for models whose weights or reference data are not here (offline machine, missing
    # download), before Ray starts and before any sampling
    runnable, refs = [], dict(ref_status or {})
    for c in todo:
        ok, why = status[c.model]
        msg = f"model {c.model} is unavailable: {why}"
        if ok:
            rkey = (c.model, c.metrics)
            if rkey not in refs:
                refs[rkey] = reference_status(c)
            ok, why = refs[rkey]
            msg = f"model {c.model}: {why}"
        if ok:
            runnable.append(c)
            continue
        on_result(c, {"row": failed_row(c, context, msg, attempts=0), "png": None, "log": msg + "\n"}, 0)
        counts["failed"] += 1
        progress.skipped(False, c.label(), msg)
    stats = {"ok": 0, "failed": 0, "crashes": 0}
    started = False
    try:
        if runnable:
            started = start_ray(args.address, getattr(args, "runtime_env_json", None))
            cluster = ray.cluster_resources()
            # models with their own `resources` run on actors of their own, one group after the other: each group
            # gets the whole cluster (simple, and no group's actors hold resources another group's cells need)
            for model, group in resource_groups(grid, runnable):
                res = resources(grid, args, cluster, model)
                got = execute(group, calibration_requests(cells), context, on_result,
                              num_workers=res["workers"], cpus_per_worker=res["cpus_per_worker"],
                              gpus_per_worker=res["gpus_per_worker"], memory_per_worker=res["memory_per_worker"],
                              imports=grid.imports + args.imports,
                              cache_root=cache_root(store), retries=args.retries, progress=progress,
                              keep_actors=not started, placement=where,
                              on_log=progress.cell_line if getattr(args, "cell_logs", True) else None)
                stats = {k: stats.get(k, 0) + v for k, v in got.items()}
    finally:
        progress.close()
        if started:
            ray.shutdown()
    failed = counts["failed"] + stats["failed"]
    lost = f", {stats['lost']} cell(s) re-queued after losing contact with their worker" if stats.get("lost") else ""
    print(f"grid {grid.name}: {stats['ok']} ok, {failed} failed, {stats['crashes']} worker crash(es){lost} in "
          f"{time.time() - t0:.0f}s; results in {runs_dir(store)}, logs in {out / 'logs' / grid.name}")
    if failed:
        raise BenchError(f"{failed} cell(s) failed; their errors are in the store and in {out / 'logs' / grid.name}")
    return 0

