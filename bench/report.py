"""Paper-style tables and plots from the results store: `python -m bench.report [--grid smoke]`.

Tables: one per model, rows = methods, columns = W/A setting x metric, mean +- 95% CI across seeds (Student t
interval; no CI with one seed), the best quantized method per column in bold, FP as the reference row. Written to
<out>/report.md and LaTeX booktabs <out>/tables/<grid>-<model>.tex. Plots (PNG + SVG) under <out>/plots/: metric vs
bit width per method, quantization time per method, per-step noise-prediction error vs FP, TDAC allocation, and the
FP / per-method sample grids from the same seed. A grid's rows must come from one clean commit (the page names it);
--allow-mixed shows several together and lists each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.errors import cli_main
from bench.metrics.names import METRICS
from bench.reporting.page import render


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=None, help="only this grid (default: every grid in the store)")
    p.add_argument("--out", default="results", help="results directory holding runs/ (default: results/); the "
                   "report is written here")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="read runs/ from this path or storage URI instead (as given to bench.run --storage)")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated metrics to tabulate (default: every one recorded; known: {', '.join(METRICS)})")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    p.add_argument("--allow-mixed", action="store_true",
                   help="show rows of several commits (or of a dirty tree) in one table, every commit listed; "
                        "by default a grid's rows must come from one clean commit")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    path = render(Path(args.out), args.grid, metrics, args.plots, args.allow_mixed, storage=args.storage)
    print(f"wrote {path}, {Path(args.out) / 'tables'}/, {Path(args.out) / 'plots'}/")
    return 0


if __name__ == "__main__":
    main()
