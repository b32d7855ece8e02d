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

from bench.errors import UsageError, cli_main
from bench.metrics.names import METRICS
from bench.reporting.regression import K_CI, REL_TOL, check_run, update_reference


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
        return update_reference(args.out, args.grid, args.baseline)
    return check_run(args.baseline, args.out, args.grid, args.rel_tol, args.k, abs_tol, metrics)


if __name__ == "__main__":
    main()
