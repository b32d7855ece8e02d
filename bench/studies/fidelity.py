"""The measured effect of each method-fidelity fix: `python -m bench.studies.fidelity`.

Each fix of docs/fidelity.md that changed a default is one commit. The `fidelity` grid (bench/grids/fidelity.toml:
digits-ddpm, W4A8, seeds 0-2, 256 samples) ran at the commit before the first fix and at each fix's commit, on the
methods that fix touches; those rows are committed as results/fidelity/<commit>.parquet. This module renders
results/fidelity.md from them: per fix and method, the metric before and after (mean ± 95% t-interval over seeds)
and the paired difference after - before by seed. Nothing on the page is typed in.

To add a run: `python -m bench.run --grid fidelity --methods M,... --out DIR` at a commit, then
`python -m bench.studies.fidelity --add DIR` copies its rows here; rerun without arguments to render.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError, cli_main
from bench.metrics.names import lower_is_better
from bench.reporting.tables import mean_ci
from bench.harness.store import read_file, read_runs, runs_dir, write_file

ROOT = Path(__file__).resolve().parents[2]
ROWS = ROOT / "results" / "fidelity"
PAGE = ROOT / "results" / "fidelity.md"
BASE = "c68bdaa"  # the last commit before the fixes
# (commit, what it fixed, methods it touches), in commit order; labels name the ledger rows (docs/fidelity.md)
FIXES = [
    ("28558db", "calibration, evaluation and eps_mse on disjoint noise streams", ["rtn", "ptq4dm", "qdiffusion", "eda-dm"]),
    ("afe25fa", "TDAC: the official rounding repair", ["eda-dm"]),
    ("ac66793", "reconstruction and quantizer details (FBR channel sums, batches without replacement, b schedule, "
                "one-sidedness, official L_p candidates)", ["rtn", "ptq4dm", "qdiffusion", "eda-dm"]),
    ("301de71", "first 8-bit layer: the time-embedding Linear, not conv_in", ["rtn", "ptq4dm", "eda-dm"]),
    ("788ae2e", "Q-Diffusion: 'max' ranges, activation ranges after weight reconstruction, FP inputs in the "
                "activation stage", ["qdiffusion"]),
    ("cf5df55", "PTQ4DM: the shipped script's NDTC and no reconstruction", ["ptq4dm"]),
]
METRICS = [("digits_fid_vs_fp", "digits-FID vs FP", 3), ("digits_fid", "digits-FID", 3),
           ("eps_mse", "eps MSE vs FP", 3)]  # (column, label, significant digits)


def load() -> dict[str, pd.DataFrame]:
    out = {}
    for p in sorted(ROWS.glob("*.parquet")):
        df = read_file(p)
        out[p.stem] = df[df["status"] == "ok"]
    return out


def _fmt(m: float, h: float, dec: int) -> str:
    if not np.isfinite(m):
        return "-"
    return f"{m:.{dec}g}" if not np.isfinite(h) else f"{m:.{dec}g} ± {h:.{dec}g}"


def _cell(df: pd.DataFrame, method: str) -> pd.DataFrame:
    return df[(df["method"] == method) & (df["bits"] == "W4A8")].set_index("seed")


def render(runs: dict[str, pd.DataFrame]) -> str:
    lines = ["# Method fidelity fixes: measured effect", "",
             "Rendered by `python -m bench.studies.fidelity` from results/fidelity/<commit>.parquet (rows of "
             "`python -m bench.run --grid fidelity` at each commit). digits-ddpm, W4A8, seeds "
             f"{_seeds(runs)}, {_samples(runs)} samples per cell, each method at a fixed CPU budget "
             "(1% of its official iterations, 256 calibration samples; Q-Diffusion 64 x 20). After - before is "
             "paired by seed (mean ± 95% t-interval). The ledger of every element is docs/fidelity.md.", "",
             "eps MSE is measured on the calibration trajectories before the noise-stream fix (in-sample) and on "
             "held-out trajectories after it, so its jump at that fix is the change of protocol, not of the "
             "method.", ""]
    if BASE not in runs:
        raise BenchError(f"no rows of the base commit {BASE} in {ROWS}; add them with --add")
    fix_shas = {f[0] for f in FIXES}
    finals = [sha for sha in runs if sha != BASE and sha not in fix_shas]
    if len(finals) > 1:
        raise BenchError(f"rows of several commits after the fixes in {ROWS}: {', '.join(finals)}; keep one")
    if finals:
        final = finals[0]
        methods = [m for m in ("rtn", "ptq4dm", "qdiffusion", "eda-dm") if m in set(runs[final]["method"])]
        lines += [f"## All fixes together ({BASE} -> {final})", "",
                  f"Every method at the commit before the fixes and at {final}, which holds all of them.", ""]
        lines += _table(runs, {m: BASE for m in methods}, final, methods)
    latest = {m: BASE for f in FIXES for m in f[2]}
    for sha, what, methods in FIXES:
        if sha not in runs:
            lines += [f"## {what} ({sha})", "", "not run yet: `python -m bench.run --grid fidelity --methods "
                      f"{','.join(methods)}` at {sha}, then `--add`", ""]
            continue
        lines += [f"## {what} ({sha})", ""]
        lines += _table(runs, latest, sha, methods)
        for meth in methods:
            if not _cell(runs[sha], meth).empty:
                latest[meth] = sha
    lines += ["Not measurable on digits: the guided-model fixes (pairs of guidance branches, Stable Diffusion's "
              "softmax bits; digits is unconditional).", ""]
    return "\n".join(lines)


def _table(runs, before_at: dict, sha: str, methods) -> list[str]:
    """Before (each method at its latest measured commit) vs after (at sha), per metric, paired by seed."""
    lines = ["| method | metric | before | after | after - before (paired) |", "|---|---|---|---|---|"]
    for meth in methods:
        before, after = _cell(runs[before_at[meth]], meth), _cell(runs[sha], meth)
        if after.empty:
            lines.append(f"| {meth} ({before_at[meth]} -> {sha}) | - | | not run at {sha} | |")
            continue
        for col, label, dec in METRICS:
            b, a = before[col].dropna(), after[col].dropna()
            common = sorted(set(b.index) & set(a.index))
            dm, dh, _ = mean_ci([a[s] - b[s] for s in common])
            verdict = ""
            if np.isfinite(dh) and abs(dm) > dh:
                better = (dm < 0) == lower_is_better(col)
                verdict = " (better)" if better else " (worse)"
            lines.append(f"| {meth} ({before_at[meth]} -> {sha}) | {label} | {_fmt(*mean_ci(b.tolist())[:2], dec)} | "
                         f"{_fmt(*mean_ci(a.tolist())[:2], dec)} | {_fmt(dm, dh, dec)}{verdict} |")
    return lines + [""]


def _seeds(runs) -> str:
    return ", ".join(str(s) for s in sorted({int(s) for df in runs.values() for s in df["seed"]}))


def _samples(runs) -> str:
    return "/".join(str(s) for s in sorted({int(s) for df in runs.values() for s in df["samples"]}))


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.studies.fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--add", metavar="OUT", help="copy the fidelity-grid rows of OUT/runs into results/fidelity/ "
                                                "(one file per commit) instead of rendering")
    args = p.parse_args(argv)
    if args.add:
        df = read_runs(runs_dir(args.add), "fidelity")
        if df.empty:
            raise BenchError(f"no fidelity rows in {runs_dir(args.add)}")
        for sha, rows in df.groupby(df["git_commit"].str[:7]):
            path = write_file(rows, ROWS / f"{sha}.parquet")
            print(f"wrote {len(rows)} rows to {path}")
        return 0
    PAGE.write_text(render(load()))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    main()
