"""Run a benchmark grid on Ray: `python -m bench.run --grid smoke` (the default; runs on the embedded digits model).

Cells already in the store are skipped (resume is the default; `--no-resume` reruns them). Results go to
<out>/runs/ (one Parquet file per cell), logs to <out>/logs/, shared FP artifacts to <out>/cache/ (or
$EDA_BENCH_CACHE/harness). Render tables with `python -m bench.report`, compare with `python -m bench.check`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from bench.errors import BenchError, UsageError, cli_main
from bench.grid import FP_METHOD, Cell, Grid, apply_overrides, available_grids, load_grid
from eda.registry import parse_overrides

DEFAULT_GRID = "smoke"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help=f"grid name under bench/grids/ ({', '.join(available_grids())}) or a .toml path "
                        f"(default: {DEFAULT_GRID})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. 'auto' or ray://host:10001 (default: start a local cluster, "
                        "dashboard off)")
    p.add_argument("--out", default="results", help="results directory (default: results/)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="rerun cells already in the store (default: skip them)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, model availability and the resources it would ask for; run nothing")
    p.add_argument("--max-workers", type=int, default=None,
                   help="at most this many actors (default: one per GPU / GPU fraction, else one per CPU slot)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPU share of one actor, e.g. 0.5 packs two actors per GPU (default: grid [resources], 1)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPU cores of one actor; also its torch thread count (default: grid [resources], 1)")
    p.add_argument("--retries", type=int, default=1,
                   help="times a cell is re-run after its worker crashed (default: 1)")
    p.add_argument("--samples", type=int, default=None, help="override the sample count of every model")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override the sampling/evaluation batch size of every model (results move at float-noise "
                        "level with it, so it is part of the cell key; default: the grid's)")
    p.add_argument("--seeds", default=None, help="override the seeds, comma-separated, e.g. 0,1,2")
    p.add_argument("--methods", default=None, help="override the methods, comma-separated, e.g. fp,rtn,eda-dm")
    p.add_argument("--bits", default=None, help="override the bit settings, comma-separated, e.g. W8A8,W4A8")
    p.add_argument("--models", default=None, help="run only these models of the grid, comma-separated")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="method override for every cell, e.g. --set iters_scale=0.1 (repeatable; wins over the grid)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE in the driver and every worker first (registers extra models or methods)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress bar")
    return p


def _csv(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def plan(args) -> Grid:
    grid = load_grid(args.grid)
    seeds = _csv(args.seeds)
    try:
        seeds = None if seeds is None else [int(s) for s in seeds]
    except ValueError:
        raise UsageError(f"bad --seeds {args.seeds!r}; expected integers, e.g. --seeds 0,1,2") from None
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return apply_overrides(grid, samples=args.samples, seeds=seeds, methods=_csv(args.methods),
                           bits=[b.upper() for b in _csv(args.bits)] if args.bits else None,
                           models=_csv(args.models), sets=parse_overrides(args.sets), batch_size=args.batch_size)


def check_metrics(grid: Grid) -> None:
    """Metric names must be ones bench.metrics.evaluate knows (or the harness's distances to FP samples)."""
    try:
        from bench.metrics import ALL_METRICS
    except ImportError:
        return
    from bench.cell import HARNESS_METRICS

    known = (*ALL_METRICS, *HARNESS_METRICS)
    bad = sorted({m for b in grid.models for m in b["metrics"] if m not in known})
    if bad:
        raise UsageError(f"unknown metric(s) {', '.join(bad)} in grid {grid.name}; expected some of {', '.join(known)}")


def import_plugins(modules: list[str]) -> None:
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise UsageError(f"cannot import {m!r} ({e}); expected an importable module that registers models or "
                             "methods") from None


def check_methods(grid: Grid) -> list[str]:
    """Every method must be registered (UsageError listing the known names otherwise)."""
    from bench.cell import available_methods

    known = available_methods()
    bad = [m for m in grid.method_names() if m != FP_METHOD and m not in known]
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)}; expected some of {', '.join(sorted(known))}")
    return known


def model_status(name: str) -> tuple[bool, str]:
    """(available, reason) without loading weights: registered in bench.models, then the zoo's offline check."""
    from bench import models

    if name not in models.available_models():
        return False, "not registered in bench.models"
    try:
        from bench.zoo import model_availability
    except ImportError:
        return True, "registered"
    try:
        ok, why = model_availability(name)
    except Exception as e:  # noqa: BLE001 - an availability check must never stop the plan
        return False, f"{type(e).__name__}: {e}"
    return bool(ok), why


def model_reference(name: str) -> tuple[str, str] | None:
    """(dataset, reference split) a zoo model is evaluated against, without loading it (None for other models:
    known only once loaded). The split is the card's, as the worker's evaluate_cell uses (COCO val2014 for SD)."""
    from bench.zoo import ZOO

    entry = ZOO.get(name)
    return None if entry is None else (entry.dataset, entry.reference_split)


def reference_status(cell: Cell) -> tuple[bool, str]:
    """(ok, why) for the reference data of a cell's metrics when its model's dataset is known without loading it;
    workers check again before sampling (bench.cell.require_reference) for the other models."""
    from bench.cell import HARNESS_METRICS
    from bench.metrics import reference_available

    ref = model_reference(cell.model)
    wanted = tuple(m for m in cell.metrics if m not in HARNESS_METRICS)
    if ref is None or not wanted:
        return True, ""
    dataset, split = ref
    return reference_available(dataset, split=split, metrics=wanted)


def default_sampler(name: str) -> str:
    """The official sampler of a zoo model, without loading it ('model default' for others)."""
    try:
        from bench.zoo import ZOO

        return ZOO[name].sampler.describe() + " (official)"
    except (ImportError, KeyError):
        return "model default"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def calibration_requests(cells: list[Cell]) -> dict:
    """(model, sampler, seed) -> unique (method, overrides) pairs: the shared trajectories must cover them all."""
    out: dict = {}
    for c in cells:
        key = (c.model, json.dumps(c.sampler, sort_keys=True), c.seed)
        pair = [c.method, c.overrides]
        if pair not in out.setdefault(key, []):
            out[key].append(pair)
    return out


def resources(grid: Grid, args, cluster: dict | None = None) -> dict:
    """What each actor asks Ray for, and how many actors (bounded by the cluster, --max-workers and the cells)."""
    res = grid.resources
    gpus_total = (cluster or {}).get("GPU", 0.0)
    cpus_total = (cluster or {}).get("CPU", float(os.cpu_count() or 1))
    gpu = args.gpus_per_worker if args.gpus_per_worker is not None else float(res.get("gpus_per_worker", 1.0))
    cpu = args.cpus_per_worker if args.cpus_per_worker is not None else float(res.get("cpus_per_worker", 1.0))
    if gpus_total > 0 and gpu > 0:
        workers = int(gpus_total // gpu)
        cpu = min(cpu, cpus_total / max(workers, 1))
    else:
        gpu = 0.0
        workers = int(cpus_total // cpu)
    if args.max_workers is not None:
        if args.max_workers < 1:
            raise UsageError(f"--max-workers must be >= 1, got {args.max_workers}")
        workers = min(workers, args.max_workers)
    return {"workers": max(workers, 1), "cpus_per_worker": cpu, "gpus_per_worker": gpu}


def print_plan(grid: Grid, cells: list[Cell], todo: list[Cell], status: dict, res: dict, cluster_note: str) -> None:
    print(f"grid {grid.name}: {len(cells)} cells, {len(todo)} to run ({len(cells) - len(todo)} already in the store)")
    if grid.description:
        print(f"  {grid.description.strip().splitlines()[0]}")
    left = {c.key for c in todo}
    for block in grid.models:
        ok, why = status[block["name"]]
        sampler = block.get("sampler") or default_sampler(block["name"])
        print(f"\nmodel {block['name']}  [{'available' if ok else 'UNAVAILABLE'}: {why}]")
        print(f"  sampler {sampler}; {block['samples']} samples; seeds {block['seeds']}; metrics "
              f"{', '.join(block['metrics']) or '-'}")
        for m in block["methods"]:
            bits = ["FP"] if m == FP_METHOD else block["bits"]
            # A grid may list one model in several blocks (digits.toml orders its run that way): count this
            # block's own cells, not every cell of the model.
            mine = [c for c in cells if c.model == block["name"] and c.method == m
                    and c.bits in bits and c.seed in block["seeds"]]
            n_left = sum(1 for c in mine if c.key in left)
            print(f"  {m:<20} {' '.join(bits):<24} {len(mine)} cells, {n_left} to run")
    want = grid.resources
    print(f"\nresources: each actor asks Ray for num_gpus={want.get('gpus_per_worker', 1)} "
          f"num_cpus={want.get('cpus_per_worker', 1)} (one actor per GPU; per CPU slot when there is no GPU)")
    print(f"  here: {res['workers']} actor(s) x (num_cpus={res['cpus_per_worker']:g}, "
          f"num_gpus={res['gpus_per_worker']:g}); {cluster_note}")


def _local_resources() -> dict:
    """CPUs and GPUs of this machine, for the dry-run plan (no Ray, no CUDA initialisation beyond a count)."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def start_ray(address: str | None):
    import ray

    if ray.is_initialized():  # e.g. a test session already holds a cluster
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise BenchError(f"could not join the Ray cluster at {address!r} ({str(e).splitlines()[0][:160]}); start "
                             "one with `ray start --head` or drop --address to run on a local cluster") from None
    else:
        # Ray starts workers at nice 15; on a shared machine that starves the grid (and distorts its timings).
        # Ray's own job manager runs submitted jobs' workers at niceness 0 (dashboard/modules/job/job_manager.py).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return True


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grid = plan(args)
    import_plugins(grid.imports + args.imports)
    out = Path(args.out)
    cells = grid.cells()
    from bench.store import done_keys, runs_dir

    done = done_keys(runs_dir(out), grid.name) if args.resume else set()
    todo = [c for c in cells if c.key not in done]
    check_methods(grid)
    check_metrics(grid)
    status = {b["name"]: model_status(b["name"]) for b in grid.models}
    unknown = [m for m, (ok, why) in status.items() if why.startswith("not registered")]
    if unknown:
        from bench.models import available_models

        raise UsageError(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(available_models())}")
    if args.dry_run:
        print_plan(grid, cells, todo, status, resources(grid, args, _local_resources()),
                   "Ray is not started by a dry run")
        return 0
    if not todo:
        print(f"grid {grid.name}: all {len(cells)} cells are already in {runs_dir(out)}; use --no-resume to rerun")
        return 0
    return execute_plan(grid, cells, todo, status, args, out)


def execute_plan(grid: Grid, cells, todo, status, args, out: Path) -> int:
    import ray

    from bench.artifacts import cache_root
    from bench.cell import failed_row
    from bench.progress import GridProgress
    from bench.worker import execute, write_result

    context = {"run_id": f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
               "git_commit": git_commit()}
    t0 = time.time()
    progress = GridProgress(len(todo), f"grid {grid.name}", enabled=args.progress)
    counts = {"ok": 0, "failed": 0}

    def on_result(cell, result, attempts):
        write_result(out, cell, result, attempts)

    # a driver killed mid-write (SIGKILL skips write_row's cleanup) leaves dotfile temps: never read, reclaimed here
    from bench.store import remove_stale_temps, runs_dir

    remove_stale_temps(runs_dir(out))
    # fail fast, per model, for models whose weights or reference data are not here (offline machine, missing
    # download), before Ray starts and before any sampling
    runnable, refs = [], {}
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
            started = start_ray(args.address)
            res = resources(grid, args, ray.cluster_resources())
            stats = execute(runnable, calibration_requests(cells), context, on_result,
                            num_workers=res["workers"], cpus_per_worker=res["cpus_per_worker"],
                            gpus_per_worker=res["gpus_per_worker"], imports=grid.imports + args.imports,
                            cache_root=str(cache_root(out)), retries=args.retries, progress=progress,
                            keep_actors=not started)
    finally:
        progress.close()
        if started:
            ray.shutdown()
    failed = counts["failed"] + stats["failed"]
    print(f"grid {grid.name}: {stats['ok']} ok, {failed} failed, {stats['crashes']} worker crash(es) in "
          f"{time.time() - t0:.0f}s; results in {runs_dir_str(out)}, logs in {out / 'logs' / grid.name}")
    if failed:
        raise BenchError(f"{failed} cell(s) failed; their errors are in the store and in {out / 'logs' / grid.name}")
    return 0


def runs_dir_str(out: Path) -> str:
    return str(out / "runs")


if __name__ == "__main__":
    sys.exit(main())
