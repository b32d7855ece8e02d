"""Run a benchmark grid on Ray: `python -m bench.run --grid smoke` (the default; runs on the embedded digits model).

Cells already in the store are skipped (resume is the default; `--no-resume` reruns them). Results go to
<out>/runs/ (one Parquet file per cell), logs to <out>/logs/, shared FP artifacts to <out>/cache/ (or
$EDA_BENCH_CACHE/harness). Render tables with `python -m bench.report`, compare with `python -m bench.check`.
"""

from __future__ import annotations

import argparse
import sys

from bench.errors import cli_main
from bench.harness.driver import run_grid
from bench.harness.grid import available_grids

DEFAULT_GRID = "smoke"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help=f"grid name under bench/grids/ ({', '.join(available_grids())}) or a .toml path "
                        f"(default: {DEFAULT_GRID})")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. 'auto', host:6379 or ray://host:10001 (default: $RAY_ADDRESS, as "
                        "`ray job submit` sets it, else a fresh local cluster with the dashboard off). On a cluster "
                        "the packages eda/, baselines/, bench/ and the EDA_BENCH_*, HF_HOME, HF_HUB_OFFLINE variables "
                        "travel to the workers in Ray's runtime_env")
    p.add_argument("--runtime-env-json", default=None, metavar="JSON",
                   help="merged into the workers' Ray runtime_env: env_vars and py_modules are added to ours (e.g. "
                        "a --import plugin package), other keys replace ours, null removes one; e.g. "
                        "'{\"py_modules\": null}' when the nodes have eda-bench installed, or "
                        "'{\"pip\": [\"diffusers\"]}'")
    p.add_argument("--out", default="results", help="results directory (default: results/)")
    p.add_argument("--storage", default=None, metavar="URI",
                   help="where the results dataset (runs/) and the FP artifact cache (cache/) live, reachable by every "
                        "node: a path (NFS), file://, s3://bucket/prefix, gs://..., or an fsspec URI (default: --out; "
                        "logs and saved samples stay under --out)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="rerun cells already in the store (default: skip them)")
    p.add_argument("--resume-from", action="append", default=[], metavar="FILE",
                   help="a results Parquet file (e.g. a committed study's rows, results/digits-study.parquet): its "
                        "successful rows of this grid whose cells the grid still plans go into the store first, so "
                        "the run resumes from them when the original --out is gone; repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, model availability and the resources it would ask for; run nothing")
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: time each available model's UNet here (GPU when visible) and print the "
                        "device-hours of its cells still to run (sampling, calibration, reconstruction upper bound)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="at most this many actors (default: one per GPU / GPU fraction, else one per CPU slot)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPU share of one actor, e.g. 0.5 packs two actors per GPU, for every model (default: the "
                        "model block's resources, else the grid's [resources], else 1)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPU cores of one actor; also its torch thread count, for every model (default: the model "
                        "block's resources, else the grid's [resources], else 1)")
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
    p.add_argument("--save-samples", action="store_true",
                   help="also save each cell's samples as <out>/samples/<grid>/<model>/<method>/<bits>-seed<s>-<key>"
                        ".npz (ADM's format: uint8 arr_0), re-scored by `bench.evaluate --samples FILE`")
    p.add_argument("--no-cell-logs", dest="cell_logs", action="store_false",
                   help="do not print the running cells' log lines (sampling batch k/n, reconstruction unit i/m, "
                        "...) as they arrive; each cell's log is still written to <out>/logs/")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
