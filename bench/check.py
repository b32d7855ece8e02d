"""Regression check: `python -m bench.check --baseline results/reference/smoke.parquet`.

Compares the latest run of the baseline's grid in <out>/runs with the committed reference and exits 1, printing the
offending cells, when

- a reference cell (model, method, bits, seed) is missing from the run, or its latest row failed, or
- a metric got worse, averaged over seeds, by more than the tolerance

      tol = max(abs_tol[metric], rel_tol * |reference mean|, k * max(CI_ref, CI_run))

  where CI is the 95% t-interval half-width across seeds (0 with one seed, so single-seed grids rely on abs/rel).
  "Worse" follows the metric's direction (lower FID is better, higher IS / precision / coverage is better).

Defaults: rel_tol 0.10, k 1.0, abs_tol below; a grid file's [check] table (rel_tol, k, abs_tol = {metric = x})
overrides them, and the command line overrides both. `--update` writes the latest run as the new reference.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from bench.errors import BenchError, UsageError, cli_main
from bench.report import LABELS, lower_is_better, mean_ci
from bench.store import METRICS, read_file, read_runs, runs_dir, write_file

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
            from bench.grid import load_grid

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


def _parse_abs(items: list[str]) -> dict:
    out = {}
    for it in items:
        name, sep, val = it.partition("=")
        if not sep or name not in METRICS:
            raise UsageError(f"bad --abs-tol {it!r}; expected METRIC=VALUE with METRIC in {', '.join(METRICS)}")
        try:
            out[name] = float(val)
        except ValueError:
            raise UsageError(f"bad --abs-tol {it!r}; the value must be a number") from None
    return out


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="reference Parquet file, e.g. results/reference/smoke.parquet")
    p.add_argument("--out", default="results", help="results directory holding runs/ (default: results/)")
    p.add_argument("--grid", default=None, help="grid to check (default: the baseline's grid)")
    p.add_argument("--rel-tol", type=float, default=None, help=f"relative tolerance (default: grid [check] or {REL_TOL})")
    p.add_argument("--k", type=float, default=None,
                   help=f"multiple of the 95%% CI half-width tolerated (default: grid [check] or {K_CI})")
    p.add_argument("--abs-tol", action="append", default=[], metavar="METRIC=VALUE",
                   help="absolute tolerance for one metric (repeatable)")
    p.add_argument("--metrics", default=None, help="compare only these metrics, comma-separated (default: all recorded)")
    p.add_argument("--update", action="store_true",
                   help="write the latest run of the grid to --baseline instead of checking (after reviewing it)")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    if metrics and (bad := [m for m in metrics if m not in METRICS]):
        raise UsageError(f"unknown metric(s) {bad}; expected some of {', '.join(METRICS)}")
    abs_tol = _parse_abs(args.abs_tol)
    if args.update:
        if not args.grid:
            raise UsageError("--update needs --grid NAME (the grid whose latest run becomes the reference)")
        cur = read_runs(runs_dir(args.out), args.grid)
        if cur.empty or (cur["status"] != "ok").any():
            raise BenchError(f"the latest run of grid {args.grid} in {args.out} is empty or has failed cells; "
                             "fix them before making it the reference")
        write_file(cur, args.baseline)
        print(f"wrote {len(cur)} cells of grid {args.grid} to {args.baseline}")
        return 0
    ref = read_file(args.baseline)
    if ref.empty:
        raise BenchError(f"{args.baseline} holds no cells; regenerate it with --update")
    grid = args.grid or ref["grid"].iloc[0]
    cur = read_runs(runs_dir(args.out), grid)
    if cur.empty:
        raise BenchError(f"no run of grid {grid} in {runs_dir(args.out)}; run `python -m bench.run --grid {grid} "
                         f"--out {args.out}` first")
    rel, k, tol = tolerances(grid, args.rel_tol, args.k, abs_tol)
    bad, compared = compare(ref[ref["grid"] == grid] if "grid" in ref else ref, cur, rel, k, tol, metrics)
    if len(bad):
        print(f"check FAILED: {len(bad)} problem(s) in grid {grid} against {args.baseline} "
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



if __name__ == "__main__":
    main()
