"""The regression check's rule (`python -m bench.check`, whose help states it): a reference cell missing or failed
in the run, or a metric worse, averaged over seeds, by more than tol = max(abs_tol[metric], rel_tol * |reference
mean|, k * max(CI_ref, CI_run)), in the metric's direction (bench.metrics.names).
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from bench.errors import BenchError, UsageError
from bench.harness.store import read_file, read_runs, runs_dir, write_file
from bench.metrics.names import LABELS, METRICS, lower_is_better
from bench.reporting.tables import mean_ci

REL_TOL = 0.10


K_CI = 1.0


# Absolute floors: differences below these are noise at the smoke grid's sample counts whatever the reference is.
ABS_TOL = {"fid": 1.0, "sfid": 1.0, "digits_fid": 0.5, "fid_vs_fp": 0.5, "digits_fid_vs_fp": 0.5, "is": 0.1, "kid": 0.002, "precision": 0.02,
           "recall": 0.02, "digits_coverage": 0.02, "digits_confidence": 0.02, "clip": 0.005, "eps_mse": 1e-5}


CELL = ["model", "method", "bits", "seed"]


def tolerances(grid: str | None, rel_tol: float | None, k: float | None, abs_tol: dict) -> tuple[float, float, dict]:
    """Defaults < the grid file's [check] table < the command line."""
    cfg = {}
    if grid:
        try:
            from bench.harness.grid import load_grid

            cfg = load_grid(grid).check
        except UsageError:
            cfg = {}
    rel = rel_tol if rel_tol is not None else float(cfg.get("rel_tol", REL_TOL))
    kk = k if k is not None else float(cfg.get("k", K_CI))
    return rel, kk, {**ABS_TOL, **cfg.get("abs_tol", {}), **abs_tol}


def compare(ref: pd.DataFrame, cur: pd.DataFrame, rel_tol: float = REL_TOL, k: float = K_CI,
            abs_tol: dict | None = None, metrics: list[str] | None = None) -> tuple[pd.DataFrame, int]:
    """(offending rows, number of metric comparisons made). Reference rows that failed are ignored."""
    abs_tol = {**ABS_TOL, **(abs_tol or {})}
    ref = ref[ref["status"] == "ok"]
    problems = []
    cur_by = cur.set_index(CELL)
    for key, r in ref.set_index(CELL).iterrows():
        if key not in cur_by.index:
            problems.append(dict(zip(CELL, key), metric="-", reference="-", current="missing", worse_by="-",
                                 tolerance="-", reason="cell missing from the run"))
            continue
        c = cur_by.loc[[key]].iloc[-1]
        if c["status"] != "ok":
            problems.append(dict(zip(CELL, key), metric="-", reference="ok", current="failed", worse_by="-",
                                 tolerance="-", reason=str(c["error"])[:120]))
    compared = 0
    ok_cur = cur[cur["status"] == "ok"]
    wanted = metrics or [m for m in METRICS if m in ref and ref[m].notna().any()]
    for (model, method, bits), g in ref.groupby(["model", "method", "bits"], sort=False):
        seeds = set(g["seed"])
        h = ok_cur[(ok_cur["model"] == model) & (ok_cur["method"] == method) & (ok_cur["bits"] == bits)
                   & ok_cur["seed"].isin(seeds)]
        if h.empty:
            continue  # already reported as missing / failed
        for m in wanted:
            rm, rh, rn = mean_ci(g[m].tolist())
            cm, ch, cn = mean_ci(h[m].tolist())
            if rn == 0:
                continue
            compared += 1
            if cn == 0:
                problems.append(dict(model=model, method=method, bits=bits, seed="all", metric=m, reference=_f(rm),
                                     current="NaN", worse_by="-", tolerance="-", reason="metric not computed"))
                continue
            worse = (cm - rm) if lower_is_better(m) else (rm - cm)
            tol = max(abs_tol.get(m, 0.0), rel_tol * abs(rm), k * max(_z(rh), _z(ch)))
            if worse > tol:
                problems.append(dict(model=model, method=method, bits=bits, seed=",".join(map(str, sorted(seeds))),
                                     metric=m, reference=_f(rm), current=_f(cm), worse_by=_f(worse),
                                     tolerance=_f(tol), reason=f"{LABELS[m]} worse beyond tolerance"))
    cols = CELL + ["metric", "reference", "current", "worse_by", "tolerance", "reason"]
    return pd.DataFrame(problems, columns=cols), compared


def _z(x: float) -> float:
    return 0.0 if not np.isfinite(x) else x


def _f(x: float) -> str:
    return "NaN" if not np.isfinite(x) else f"{x:.4g}"


def update_reference(out, grid: str | None, baseline) -> int:
    """`--update`: the latest run of `grid` in <out>/runs becomes the reference file `baseline`."""
    if not grid:
        raise UsageError("--update needs --grid NAME (the grid whose latest run becomes the reference)")
    cur = read_runs(runs_dir(out), grid)
    if cur.empty or (cur["status"] != "ok").any():
        raise BenchError(f"the latest run of grid {grid} in {out} is empty or has failed cells; "
                         "fix them before making it the reference")
    write_file(cur, baseline)
    print(f"wrote {len(cur)} cells of grid {grid} to {baseline}")
    return 0


def check_run(baseline, out, grid: str | None, rel_tol: float | None, k: float | None, abs_tol: dict,
              metrics: list[str] | None) -> int:
    """Compare the latest run of the baseline's grid (or `grid`) with the reference; print the offending cells and
    exit 1 on a regression, else print a summary and return 0."""
    ref = read_file(baseline)
    if ref.empty:
        raise BenchError(f"{baseline} holds no cells; regenerate it with --update")
    grid = grid or ref["grid"].iloc[0]
    cur = read_runs(runs_dir(out), grid)
    if cur.empty:
        raise BenchError(f"no run of grid {grid} in {runs_dir(out)}; run `python -m bench.run --grid {grid} "
                         f"--out {out}` first")
    rel, k, tol = tolerances(grid, rel_tol, k, abs_tol)
    bad, compared = compare(ref[ref["grid"] == grid] if "grid" in ref else ref, cur, rel, k, tol, metrics)
    if len(bad):
        print(f"check FAILED: {len(bad)} problem(s) in grid {grid} against {baseline} "
              f"(tol = max(abs, {rel:g} x |ref|, {k:g} x CI)):")
        print(bad.to_markdown(index=False) if _has_tabulate() else bad.to_string(index=False))
        sys.stdout.flush()
        raise SystemExit(1)
    print(f"check passed: grid {grid}, {ref['cell_key'].nunique()} reference cells, {compared} metric comparisons "
          f"within tolerance (max(abs, {rel:g} x |ref|, {k:g} x CI))")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
