"""The report page: <out>/report.md with one section per grid (tables, failed cells, plots) and the LaTeX tables
under <out>/tables/, rendered from the store in <out>/runs (`python -m bench.report`).
"""

from __future__ import annotations

from pathlib import Path

from bench.errors import UsageError
from bench.harness.store import read_runs, runs_dir
from bench.reporting.plots import plots
from bench.reporting.provenance import require_one_commit, require_one_configuration
from bench.reporting.tables import aggregate, method_order, model_table, shown_metrics


def render(out: Path, grid: str | None = None, metrics: list[str] | None = None, make_plots: bool = True,
           allow_mixed: bool = False, storage: str | None = None) -> Path:
    """Write report.md, tables/*.tex and plots/* under `out` from the store in `storage`/runs (a folder or storage
    URI; default `out`); returns report.md. Each grid's rows must come from one clean commit unless `allow_mixed`
    (bench.reporting.provenance)."""
    root = runs_dir(storage or out)
    df = read_runs(root, grid)
    if df.empty:
        raise UsageError(f"no results for grid {grid or '(any)'} in {root}; run `python -m bench.run"
                         f"{' --grid ' + grid if grid else ''}` first")
    lines = ["# eda-bench results", ""]
    # the rows whose numbers a table shows (failed cells carry none); refused before anything is written
    sections = {g: require_one_commit(df[(df["grid"] == g) & (df["status"] == "ok")], f"grid {g!r} in {root}",
                                      allow_mixed) for g in dict.fromkeys(df["grid"])}
    for g in sections:
        require_one_configuration(df[(df["grid"] == g) & (df["status"] == "ok")], f"grid {g!r} in {root}")
    for g, commits in sections.items():
        lines += _grid_section(df[df["grid"] == g], g, out, root, metrics, make_plots, commits)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _grid_section(df, grid, out, root, metrics, make_plots, commits: str) -> list[str]:
    ok, failed = df[df["status"] == "ok"], df[df["status"] != "ok"]
    methods = method_order(df, grid)
    shown = shown_metrics(ok, metrics)
    agg = aggregate(ok, shown)
    lines = [f"## grid `{grid}`", "",
             f"{len(ok)} cells ok, {len(failed)} failed; runs {', '.join(sorted(df['run_id'].dropna().unique()))}; "
             f"{commits}; last cell {df['time'].max():%Y-%m-%d %H:%M} UTC.",
             "Values are the mean over seeds ± the 95% t-interval half-width (no interval with one seed); "
             "bold = best quantized method per column; ↓ lower is better, ↑ higher is better.", ""]
    (out / "tables").mkdir(parents=True, exist_ok=True)
    for model in dict.fromkeys(ok["model"]):
        sub = ok[ok["model"] == model]
        seeds = sorted(sub["seed"].unique())
        lines += [f"### {model}", "",
                  f"dataset {sub['dataset'].iloc[0]}, sampler {sub['sampler'].iloc[0]}, "
                  f"{int(sub['samples'].iloc[0])} samples per cell, seeds {', '.join(map(str, seeds))}", "",
                  model_table(agg, model, methods, shown), ""]
        tex = out / "tables" / f"{grid}-{model}.tex"
        tex.write_text(model_table(agg, model, methods, shown, latex=True) + "\n")
        q = sub.groupby("method", sort=False)["quant_seconds"].mean()
        lines += ["Quantization time (s, mean): " + ", ".join(f"{m} {q[m]:.1f}" for m in methods if m in q), ""]
    if len(failed):
        lines += ["### failed cells", "", "| model | method | bits | seed | error |", "|---|---|---|---|---|"]
        lines += [f"| {r.model} | {r.method} | {r.bits} | {r.seed} | {r.error} |" for r in failed.itertuples()]
        lines.append("")
    if make_plots and len(ok):
        made = plots(ok, agg, grid, methods, shown, out, root)
        pngs = [p for p in made if p.suffix == ".png"]
        lines += ["### plots", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in pngs] + [""]
    return lines
