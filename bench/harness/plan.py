"""Planning a grid run: the grid with the command line's overrides, plugin imports, checks of methods, metrics and
models, which models and reference data are here (without loading them), what each Ray actor asks for, and the dry
run's printout (`python -m bench.run --dry-run`).
"""

from __future__ import annotations

import importlib
import json
import os

from bench.errors import UsageError
from bench.harness.grid import FP_METHOD, Cell, Grid, apply_overrides, load_grid
from bench.metrics.names import GRID_METRICS, HARNESS_METRICS
from eda.registry import parse_overrides


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
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    return apply_overrides(grid, samples=args.samples, seeds=seeds, methods=_csv(args.methods),
                           bits=[b.upper() for b in _csv(args.bits)] if args.bits else None,
                           models=_csv(args.models), sets=parse_overrides(args.sets), batch_size=batch_size)


def check_metrics(grid: Grid) -> None:
    """Metric names must be ones bench.metrics.score.evaluate knows (or the harness's distances to FP samples)."""
    known = GRID_METRICS
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
    from bench.harness.cell import available_methods

    known = available_methods()
    bad = [m for m in grid.method_names() if m != FP_METHOD and m not in known]
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)}; expected some of {', '.join(sorted(known))}")
    return known


def model_status(name: str) -> tuple[bool, str]:
    """(available, reason) without loading weights: registered in bench.models, then the zoo's offline check; a
    local directory (as bench.models.load_model accepts, so a grid can name one as the CLIs do) when it holds a
    diffusers UNet config."""
    from bench.models.registry import available_models

    if name not in available_models():
        if os.path.isdir(name):
            unet = "unet/config.json" if os.path.isfile(os.path.join(name, "unet", "config.json")) else "config.json"
            if os.path.isfile(os.path.join(name, unet)):
                return True, f"local diffusers directory ({unet})"
            return False, "a directory without a diffusers UNet (config.json or unet/config.json)"
        return False, "not registered in bench.models"
    try:
        from bench.models.zoo import model_availability
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
    from bench.models.zoo import ZOO

    entry = ZOO.get(name)
    return None if entry is None else (entry.dataset, entry.reference_split)


def reference_status(cell: Cell) -> tuple[bool, str]:
    """(ok, why) for the reference data of a cell's metrics when its model's dataset is known without loading it;
    workers check again before sampling (bench.harness.cell.require_reference) for the other models."""
    from bench.metrics.reference import reference_available

    ref = model_reference(cell.model)
    wanted = tuple(m for m in cell.metrics if m not in HARNESS_METRICS)
    if ref is None or not wanted:
        return True, ""
    dataset, split = ref
    return reference_available(dataset, split=split, metrics=wanted, mode=cell.fid_mode,
                               stats_file=cell.reference_stats)


def default_sampler(name: str) -> str:
    """The official sampler of a zoo model, without loading it ('model default' for others)."""
    try:
        from bench.models.zoo import ZOO

        return ZOO[name].sampler.describe() + " (official)"
    except (ImportError, KeyError):
        return "model default"


def calibration_requests(cells: list[Cell]) -> dict:
    """(model, sampler, seed) -> unique (method, overrides) pairs: the shared trajectories must cover them all."""
    out: dict = {}
    for c in cells:
        key = (c.model, json.dumps(c.sampler, sort_keys=True), c.seed)
        pair = [c.method, c.overrides]
        if pair not in out.setdefault(key, []):
            out[key].append(pair)
    return out


def resources(grid: Grid, args, cluster: dict | None = None, model: str | None = None) -> dict:
    """What each actor asks Ray for, and how many actors (bounded by the cluster, --max-workers and the cells).
    Per actor: --gpus/--cpus-per-worker, else the model block's `resources` (for `model`), else the grid's
    [resources], else 1; memory only from the model block (None: Ray's default, no reservation)."""
    res = grid.resources
    mine = grid.model_resources.get(model, {}) if model else {}
    gpus_total = (cluster or {}).get("GPU", 0.0)
    cpus_total = (cluster or {}).get("CPU", float(os.cpu_count() or 1))
    gpu = args.gpus_per_worker if args.gpus_per_worker is not None else \
        float(mine.get("gpus", res.get("gpus_per_worker", 1.0)))
    cpu = args.cpus_per_worker if args.cpus_per_worker is not None else \
        float(mine.get("cpus", res.get("cpus_per_worker", 1.0)))
    memory = mine.get("memory")
    if gpus_total > 0 and gpu > 0:
        workers = int(gpus_total // gpu)
        cpu = min(cpu, cpus_total / max(workers, 1))
    else:
        gpu = 0.0
        workers = int(cpus_total // cpu)
    if memory and (cluster or {}).get("memory"):
        workers = min(workers, int(cluster["memory"] // memory))
    if args.max_workers is not None:
        if args.max_workers < 1:
            raise UsageError(f"--max-workers must be >= 1, got {args.max_workers}")
        workers = min(workers, args.max_workers)
    return {"workers": max(workers, 1), "cpus_per_worker": cpu, "gpus_per_worker": gpu, "memory_per_worker": memory}


def resource_groups(grid: Grid, cells: list[Cell]) -> list[tuple[str | None, list[Cell]]]:
    """Cells split by the actors they need: one group per model with its own `resources` (in grid order), then
    one group (None) for every other model. Each group runs on its own actors, one group after the other."""
    groups: dict[str | None, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.model if c.model in grid.model_resources else None, []).append(c)
    return list(groups.items())


def reference_line(block: dict, cells: list[Cell]) -> str:
    """What the dry run says of a block's reference data: ok, MISSING with what to put where, or checked later."""
    mine = [c for c in cells if c.model == block["name"]]
    if not mine or not any(m not in HARNESS_METRICS for m in mine[0].metrics):
        return "reference data: none needed by these metrics"
    try:
        known = model_reference(block["name"]) is not None
    except ImportError:
        known = False
    if not known:
        return "reference data: checked by each worker before sampling (the dataset is known once the model loads)"
    ok, why = reference_status(mine[0])
    return "reference data: ok" if ok else f"reference data MISSING: {why}"


def print_plan(grid: Grid, cells: list[Cell], todo: list[Cell], status: dict, res: dict, cluster_note: str,
               model_res: dict | None = None, scope: str = "here") -> None:
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
        print(f"  {reference_line(block, cells)}")
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
    print(f"  {scope}: {res['workers']} actor(s) x (num_cpus={res['cpus_per_worker']:g}, "
          f"num_gpus={res['gpus_per_worker']:g}); {cluster_note}")
    for model, r in (model_res or {}).items():
        mem = "" if r["memory_per_worker"] is None else f", memory={r['memory_per_worker'] / 2**30:g}GiB"
        print(f"  model {model} (its block's resources): {r['workers']} actor(s) x (num_cpus={r['cpus_per_worker']:g}, "
              f"num_gpus={r['gpus_per_worker']:g}{mem}), its cells run as a group of their own")
    many = [f"{m} ({r['gpus_per_worker']:g})" for m, r in [("the grid", res), *(model_res or {}).items()]
            if r["gpus_per_worker"] > 1]
    if many:  # Ray reserves them all, but a cell runs on one device: no model parallelism inside a cell
        print(f"  note: actors of {', '.join(many)} reserve several GPUs each but run each cell on the first of them; "
              "gpus = 1 runs more actors at once")


def local_resources() -> dict:
    """CPUs and GPUs of this machine, for the dry-run plan (no Ray, no CUDA initialisation beyond a count)."""
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}
