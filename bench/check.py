"""Regression check: `python -m bench.check --baseline results/reference/smoke.parquet`.

Compares the latest run of the baseline's grid in <out>/runs with the committed reference and exits 1, printing a
table of the offending cells (and writing it as Markdown with --markdown), when

- a reference cell (model, method, bits, seed) is missing from the run, or its latest row failed, or
- a metric got worse beyond its window, paired seed by seed:

      window_s = max(abs[metric], rel[metric] * |reference_s|)     the float-noise window of seed s's value
      z_s      = (current_s - reference_s) / window_s              signed so that worse is positive
      fail when mean_s z_s > max(1, k * CI(z))                     CI: 95% t half-width of the z_s over seeds

  With one seed this is "worse by more than the window". With two or more, the mean over seeds must exceed one
  window, and a change whose sign and size scatter across seeds by more than that (CI) counts as seed noise, not as
  a regression. Differences are taken per seed (the reference and the run use the same seeds and the same initial
  noise), and relative to each seed's window, so a uniform relative regression has no scatter across seeds.

Why these windows. A rerun of the same code on another machine differs from the reference only by floating-point
details: kernels (CPU ISA, oneDNN), thread count, batch size. Quantized sampling amplifies those (a rounding decision
flips, 100 steps carry it on), so the windows are set from measurements of exactly that: `python -m bench.noise`
reran the smoke grid with 2 threads, batch 32, CPU kernels capped at AVX2, and oneDNN off, and the windows below
are about 2x the largest change it saw on any quantized cell (results/noise.md, "Per metric"). Bounded metrics
(coverage, confidence, precision, recall) get absolute windows only; metrics that are 0 for the FP cell by
definition (eps_mse, mse_vs_fp, *_vs_fp) get a small absolute floor, so a value near zero never has a window of
zero. Metrics the smoke grid does not compute keep the previous floors, marked "not measured" below.

A grid file's [check] table (rel_tol = x or {metric = x}, abs_tol = {metric = x}, k) overrides these defaults, and
the command line overrides both. A single relative number applies to every unbounded metric. `--update` writes the
latest run as the new reference.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError, UsageError, cli_main
from bench.report import LABELS, lower_is_better
from bench.store import METRICS, read_file, read_runs, runs_dir, write_file

K_CI = 1.0
BOUNDED = frozenset({"precision", "recall", "digits_coverage", "digits_confidence"})  # in [0, 1]: absolute only
# (abs, rel) window per metric. Measured: the smoke grid's metrics, from results/noise.md (see the module docstring).
TOLERANCES: dict[str, tuple[float, float]] = {
    "fid": (1.0, 0.10),
    "digits_fid": (0.5, 0.10),
    "digits_fid_vs_fp": (0.5, 0.10),
    "digits_coverage": (0.05, 0.0),
    "digits_confidence": (0.02, 0.0),
    "eps_mse": (1e-5, 0.10),
    "mse_vs_fp": (1e-5, 0.10),
    # not measured (not computed by the smoke grid): the previous absolute floors and a 10% relative window
    "sfid": (1.0, 0.10), "is": (0.1, 0.10), "kid": (0.002, 0.10), "fid_vs_fp": (0.5, 0.10), "clip": (0.005, 0.10),
    "precision": (0.02, 0.0), "recall": (0.02, 0.0),
}
MEASURED = ("fid", "digits_fid", "digits_fid_vs_fp", "digits_coverage", "digits_confidence", "eps_mse", "mse_vs_fp")
CELL = ["model", "method", "bits", "seed"]
GROUP = ["model", "method", "bits"]
PROBLEM_COLUMNS = CELL + ["metric", "reference", "current", "worse_by", "tolerance", "reason"]


def effective_tolerances(tolerances: dict | None = None, rel_tol: float | dict | None = None,
                         abs_tol: dict | None = None) -> dict[str, tuple[float, float]]:
    """TOLERANCES updated by `tolerances` ({metric: (abs, rel)}), then a relative window (one number for every
    unbounded metric, or {metric: rel}), then absolute windows {metric: abs}."""
    out = {**TOLERANCES, **(tolerances or {})}
    if isinstance(rel_tol, dict):
        bounded = sorted(set(rel_tol) & BOUNDED)
        if bounded:
            raise UsageError(f"{', '.join(bounded)} are bounded in [0, 1] and take an absolute window only; give "
                             "them abs_tol instead of rel_tol")
        out.update({m: (out.get(m, (0.0, 0.0))[0], float(r)) for m, r in rel_tol.items()})
    elif rel_tol is not None:
        out = {m: (a, 0.0 if m in BOUNDED else float(rel_tol)) for m, (a, _) in out.items()}
    out.update({m: (float(a), out.get(m, (0.0, 0.0))[1]) for m, a in (abs_tol or {}).items()})
    return out


def window(metric: str, reference: float, tolerances: dict | None = None) -> float:
    """The window of one seed's value: max(abs, rel x |reference|); `tolerances` as from effective_tolerances."""
    a, r = (tolerances or TOLERANCES).get(metric, (0.0, 0.0))
    ref = abs(reference) if reference is not None and math.isfinite(reference) else 0.0
    return max(a, r * ref)


def t_half_width(values) -> float:
    """95% t-interval half-width of the mean (0 for fewer than two values)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return 0.0
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def tolerances_for(grid: str | None, rel_tol=None, k: float | None = None, abs_tol: dict | None = None
                   ) -> tuple[float, dict]:
    """(k, {metric: (abs, rel)}): defaults < the grid file's [check] table < the command line."""
    cfg = {}
    if grid:
        try:
            from bench.grid import load_grid

            cfg = load_grid(grid).check
        except UsageError:
            cfg = {}
    tol = effective_tolerances(None, cfg.get("rel_tol"), cfg.get("abs_tol"))
    tol = effective_tolerances(tol, rel_tol, abs_tol)
    return (k if k is not None else float(cfg.get("k", K_CI))), tol


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, bits, seed): the newest. A results directory may hold reruns of a cell under
    another cell key (another batch size); the check compares the latest."""
    if df.empty:
        return df
    return df.sort_values("time", kind="stable").drop_duplicates(CELL, keep="last")


def compare_all(ref: pd.DataFrame, cur: pd.DataFrame, rel_tol=None, k: float = K_CI, abs_tol: dict | None = None,
                metrics: list[str] | None = None, tolerances: dict | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(problems, every comparison made). Reference rows that failed are ignored."""
    tol = effective_tolerances(tolerances, rel_tol, abs_tol)
    ref = _latest(ref[ref["status"] == "ok"])
    cur = _latest(cur)
    problems = []
    cur_by = cur.set_index(CELL)
    for key in ref.set_index(CELL).index:
        if key not in cur_by.index:
            problems.append(dict(zip(CELL, key), metric="-", reference="-", current="missing", worse_by="-",
                                 tolerance="-", reason="cell missing from the run"))
        elif (c := cur_by.loc[key]).get("status") != "ok":
            problems.append(dict(zip(CELL, key), metric="-", reference="ok", current="failed", worse_by="-",
                                 tolerance="-", reason=str(c["error"])[:120]))
    ok_cur = cur[cur["status"] == "ok"].set_index(CELL)
    wanted = metrics or [m for m in METRICS if m in ref and ref[m].notna().any()]
    comparisons = []
    for key, g in ref.groupby(GROUP, sort=False):
        g = g.set_index(CELL)
        both = g.index.intersection(ok_cur.index)
        if both.empty:
            continue  # already reported as missing / failed
        seeds = ",".join(str(s) for s in sorted(i[-1] for i in both))
        for m in wanted:
            r = g.loc[both, m].to_numpy(float)
            c = ok_cur.loc[both, m].to_numpy(float)
            have = np.isfinite(r)
            if not have.any():
                continue
            r, c = r[have], c[have]
            base = dict(zip(GROUP, key), seed=seeds, metric=m, reference=_f(r.mean()))
            if not np.isfinite(c).all():
                comparisons.append({**base, "current": "NaN", "worse_by": "-", "tolerance": "-", "z": math.inf,
                                    "limit": 1.0, "ok": False})
                problems.append({**base, "current": "NaN", "worse_by": "-", "tolerance": "-",
                                 "reason": "metric not computed"})
                continue
            worse = (c - r) if lower_is_better(m) else (r - c)
            w = np.array([window(m, x, tol) for x in r])
            z = np.divide(worse, w, out=np.where(worse > 0, np.inf, 0.0), where=w > 0)
            ci = t_half_width(z) if np.isfinite(z).all() else 0.0
            limit = max(1.0, k * ci)
            zbar = float(z.mean())
            ok = not zbar > limit
            row = {**base, "current": _f(c.mean()), "worse_by": _f(worse.mean()), "tolerance": _f(limit * w.mean()),
                   "z": zbar, "limit": limit, "ok": ok}
            comparisons.append(row)
            if not ok:
                ci_note = f", CI {_f(ci)}" if len(z) > 1 else ""
                problems.append({**base, "current": row["current"], "worse_by": row["worse_by"],
                                 "tolerance": row["tolerance"],
                                 "reason": f"{LABELS[m]} worse by {_f(zbar)} windows (limit {_f(limit)}{ci_note})"})
    cols = GROUP + ["seed", "metric", "reference", "current", "worse_by", "tolerance", "z", "limit", "ok"]
    return pd.DataFrame(problems, columns=PROBLEM_COLUMNS), pd.DataFrame(comparisons, columns=cols)


def compare(ref: pd.DataFrame, cur: pd.DataFrame, rel_tol=None, k: float = K_CI, abs_tol: dict | None = None,
            metrics: list[str] | None = None, tolerances: dict | None = None) -> tuple[pd.DataFrame, int]:
    """(offending rows, number of metric comparisons made); see compare_all."""
    problems, comparisons = compare_all(ref, cur, rel_tol, k, abs_tol, metrics, tolerances)
    return problems, len(comparisons)


def _f(x: float) -> str:
    return "NaN" if not np.isfinite(x) else f"{x:.4g}"


def _parse_pairs(items: list[str], flag: str) -> dict:
    out = {}
    for it in items:
        name, sep, val = it.partition("=")
        if not sep or name not in METRICS:
            raise UsageError(f"bad {flag} {it!r}; expected METRIC=VALUE with METRIC in {', '.join(METRICS)}")
        try:
            out[name] = float(val)
        except ValueError:
            raise UsageError(f"bad {flag} {it!r}; the value must be a number") from None
    return out


def _parse_rel(items: list[str]) -> float | dict | None:
    """--rel-tol X (every unbounded metric) or --rel-tol METRIC=X (repeatable)."""
    if not items:
        return None
    plain = [it for it in items if "=" not in it]
    if plain:
        if len(items) > 1:
            raise UsageError(f"bad --rel-tol {items}; give one number for every metric or METRIC=VALUE pairs, not both")
        try:
            return float(plain[0])
        except ValueError:
            raise UsageError(f"bad --rel-tol {plain[0]!r}; expected a number such as 0.1 or METRIC=VALUE") from None
    return _parse_pairs(items, "--rel-tol")


def markdown(verdict: str, rule: str, problems: pd.DataFrame, comparisons: pd.DataFrame, title: str) -> str:
    """The check as a page a person reads in the CI run: verdict, rule, the problems, then every comparison."""
    lines = [f"# {title}", "", verdict, "", rule, ""]
    if len(problems):
        lines += ["## Problems", "", _table(problems), ""]
    if len(comparisons):
        c = comparisons.copy()
        c["windows"] = [("inf" if not np.isfinite(z) else f"{z:+.2f}") for z in c["z"]]
        c["status"] = np.where(c["ok"], "ok", "**worse**")
        c = c.drop(columns=["z", "ok"]).assign(limit=[f"{x:.2f}" for x in c["limit"]])
        lines += ["## Every comparison", "",
                  "windows: mean over seeds of (current - reference) / window, positive = worse; the check fails "
                  "above the limit.", "", _table(c), ""]
    return "\n".join(lines)


def _table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    esc = [[str(v).replace("|", "\\|").replace("\n", " ") for v in r] for r in df.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |"
                                                                                   for r in esc])


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="reference Parquet file, e.g. results/reference/smoke.parquet")
    p.add_argument("--out", default="results", help="results directory holding runs/ (default: results/)")
    p.add_argument("--grid", default=None, help="grid to check (default: the baseline's grid)")
    p.add_argument("--rel-tol", action="append", default=[], metavar="X|METRIC=X",
                   help="relative window: one number for every unbounded metric, or METRIC=X (repeatable; default: "
                        "grid [check], else bench.check.TOLERANCES)")
    p.add_argument("--k", type=float, default=None,
                   help=f"multiple of the 95%% CI of the per-seed changes tolerated (default: grid [check] or {K_CI})")
    p.add_argument("--abs-tol", action="append", default=[], metavar="METRIC=VALUE",
                   help="absolute window for one metric (repeatable)")
    p.add_argument("--metrics", default=None, help="compare only these metrics, comma-separated (default: all recorded)")
    p.add_argument("--markdown", default=None, metavar="PATH",
                   help="also write the verdict and every comparison as a Markdown page (written on pass and fail)")
    p.add_argument("--update", action="store_true",
                   help="write the latest run of the grid to --baseline instead of checking (after reviewing it)")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    if metrics and (bad := [m for m in metrics if m not in METRICS]):
        raise UsageError(f"unknown metric(s) {bad}; expected some of {', '.join(METRICS)}")
    abs_tol = _parse_pairs(args.abs_tol, "--abs-tol")
    rel_tol = _parse_rel(args.rel_tol)
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
    k, tol = tolerances_for(grid, rel_tol, args.k, abs_tol)
    problems, comparisons = compare_all(ref[ref["grid"] == grid] if "grid" in ref else ref, cur, k=k,
                                        metrics=metrics, tolerances=tol)
    rule = (f"Rule (bench/check.py): per seed, window = max(abs, rel x |reference|); fails when the mean over seeds "
            f"of (current - reference) / window exceeds max(1, {k:g} x its 95% CI).")
    commit = ", ".join(sorted(set(ref["git_commit"].dropna().astype(str).str[:12]))) or "?"
    if len(problems):
        verdict = (f"check FAILED: {len(problems)} problem(s) in grid {grid} against {args.baseline} (reference "
                   f"commit {commit}; {len(comparisons)} metric comparisons)")
    else:
        verdict = (f"check passed: grid {grid}, {ref['cell_key'].nunique()} reference cells (commit {commit}), "
                   f"{len(comparisons)} metric comparisons within their windows")
    if args.markdown:
        from bench.store import write_atomic

        text = markdown(verdict, rule, problems, comparisons, f"Regression check: grid {grid}")
        write_atomic(Path(args.markdown), lambda tmp: Path(tmp).write_text(text))
    print(verdict)
    if len(problems):
        print(rule)
        print(_table(problems))
        sys.stdout.flush()
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    main()
