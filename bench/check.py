"""Regression check: `python -m bench.check --baseline results/reference/smoke.parquet`.

Compares the latest run of the baseline's grid in <out>/runs with the committed reference and exits 1, printing a
table of the offending cells (and writing it as Markdown with --markdown), when

- a reference cell (model, method, bits, seed) is missing from the run, or its latest row failed, or
- a cell ran with another configuration than the reference (samples, sampler, method knobs): it is named with the
  settings that differ and never compared or averaged in (the batch size moves results at float level only and is
  covered by the windows), or
- a metric got worse beyond its window, paired seed by seed:

      window_s = max(abs[metric], rel[metric] * |reference_s|)     the float-noise window of seed s's value
      z_s      = (current_s - reference_s) / window_s              signed so that worse is positive
      fail when mean_s z_s > max(1, k * CI(z))                     CI: 95% t half-width of the z_s over seeds

  With one seed this is "worse by more than the window". With two or more, the mean over seeds must exceed one
  window, and a change whose sign and size scatter across seeds by more than that (CI) counts as seed noise, not as
  a regression. Differences are taken per seed (the reference and the run use the same seeds and the same initial
  noise), and relative to each seed's window, so a uniform relative regression has no scatter across seeds.

Why these windows. A rerun of the same code on another machine differs from the reference only by floating-point
details: kernels (CPU ISA, oneDNN), thread count, batch size. Quantized sampling amplifies those, and a method that
reconstructs amplifies them again (an AdaRound decision flips, the model differs), so the windows were set from
measurements of exactly that: `python -m bench.noise --variants base,threads=2,batch=32,isa=avx2` reran the smoke
grid with 2 threads per worker, batch 32 and CPU kernels capped at AVX2 (results/noise.md). The largest spread
between any two of those float outcomes of one cell, in either direction, was EDA-DM W4A8's: eps_mse 3.6%, fid 4.1%,
digits_fid 24%, mse_vs_fp 40%, digits_fid_vs_fp 142% (6.3 to 15.4: at 128 samples this metric is dominated by
which rounding decisions flipped, so its window only catches a collapse). RTN and PTQ4DM cells (no reconstruction)
moved by at most 7.4% (digits_fid_vs_fp) and under 2% on eps_mse, fid and digits_fid. Each relative window is about twice that spread; bounded metrics (coverage, confidence,
precision, recall) get absolute windows only (coverage never moved: one lost class of ten, 0.1, fails); metrics
that are 0 for FP by definition get a small absolute floor, so a value near zero never has a window of zero.
tests/test_check_power.py replays the rule on those committed rows: every pair of float outcomes passes in both
directions, and the regressions a user cares about fail (eps_mse +20%, FID doubled, classes lost, EDA-DM's row
replaced by round-to-nearest's at W4A8 and W8A8). Metrics the smoke grid does not compute keep the previous floors,
marked "not measured" below.

Exit status: 0 the check passed; 1 it found a regression (the table above); 2 a usage error (bad flags); 3 the
check could not run: the baseline file is missing, unreadable or empty, or --out holds no run of its grid. A nightly
job can tell "the code got worse" (1) from "the job is broken" (3).

A grid file's [check] table (rel_tol = x or {metric = x}, abs_tol = {metric = x}, k) overrides these defaults, and
the command line overrides both. A single relative number applies to every unbounded metric. `--update` writes the
latest run as the new reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import BenchError, UsageError, cli_main
from bench.harness.store import read_file, read_runs, runs_dir, write_atomic, write_file
from bench.metrics.names import METRICS
from bench.reporting.regression import (  # noqa: F401  (re-exported: the documented import path of the rule)
    BOUNDED, K_CI, MEASURED, TOLERANCES, _table, compare, compare_all, effective_tolerances, markdown, t_half_width,
    tolerances_for, window)


class CannotCheck(BenchError):
    """The inputs of the check are not there or not readable: no verdict on the code was reached."""

    exit_code = 3


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


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="reference Parquet file, e.g. results/reference/smoke.parquet")
    p.add_argument("--out", default="results", help="results directory or storage URI holding runs/ (as given to "
                   "bench.run --out, or its --storage; default: results/)")
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
    p.add_argument("--allow-dirty", action="store_true",
                   help="with --update: accept rows from a dirty tree or from several commits")
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
        commits = sorted(set(cur["git_commit"].fillna("").astype(str)))
        if not args.allow_dirty and (len(commits) != 1 or not commits[0] or commits[0].endswith("-dirty")):
            raise BenchError(f"the run of grid {args.grid} in {args.out} comes from commit(s) {commits}; a reference "
                             "comes from one clean commit (commit first, rerun with --no-resume), or pass --allow-dirty")
        write_file(cur, args.baseline)
        print(f"wrote {len(cur)} cells of grid {args.grid} to {args.baseline}")
        return 0
    try:
        ref = read_file(args.baseline)
    except BenchError as e:
        raise CannotCheck(str(e)) from None
    if ref.empty:
        raise CannotCheck(f"{args.baseline} holds no cells; regenerate it with --update")
    grid = args.grid or ref["grid"].iloc[0]
    try:
        cur = read_runs(runs_dir(args.out), grid)
    except BenchError as e:
        raise CannotCheck(str(e)) from None
    if cur.empty:
        raise CannotCheck(f"no run of grid {grid} in {runs_dir(args.out)}; run `python -m bench.run --grid {grid} "
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
