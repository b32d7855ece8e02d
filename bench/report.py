"""Paper-style tables and plots from the results store: `python -m bench.report [--grid smoke]`.

Tables: one per model, rows = methods, columns = W/A setting x metric, mean +- 95% CI across seeds (Student t
interval; no CI with one seed), the best quantized method per column in bold, FP as the reference row. Written to
<out>/report.md and LaTeX booktabs <out>/tables/<grid>-<model>.tex. Plots (PNG + SVG) under <out>/plots/: metric vs
bit width per method, quantization time per method, per-step noise-prediction error vs FP, TDAC allocation, and the
FP / per-method sample grids from the same seed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UsageError, cli_main
from bench.grid import FP_BITS, FP_METHOD
from bench.store import METRICS, read_runs, runs_dir

LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "kid": "KID", "precision": "Prec", "recall": "Rec",
          "digits_fid": "dFID", "digits_coverage": "dCov", "digits_confidence": "dConf", "fid_vs_fp": "FID-FP",
          "digits_fid_vs_fp": "dFID-FP",
          "clip": "CLIP", "eps_mse": "MSE(eps)", "mse_vs_fp": "MSE-FP", "int8_latency_ms": "int8 ms",
          "int8_speedup": "int8 speed-up"}
HIGHER_IS_BETTER = {"is", "precision", "recall", "digits_coverage", "digits_confidence", "clip", "int8_speedup"}


def lower_is_better(metric: str) -> bool:
    return metric not in HIGHER_IS_BETTER


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, 95% CI half-width by the t distribution, n) over the finite values; half-width NaN when n < 2."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(v[0]), math.nan, 1
    half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)
    return float(v.mean()), float(half), n


def bits_order(bits) -> list[str]:
    """FP first, then by weight bits, then activation bits, both descending (W8A8, W4A8, W4A6, W3A8 ...)."""
    def key(b):
        if b == FP_BITS:
            return (0, 0, 0)
        w, a = b[1:].split("A")
        return (1, -int(w), -int(a))

    return sorted(set(bits), key=key)


def method_order(df: pd.DataFrame, grid: str | None) -> list[str]:
    """The grid file's order when the grid is known, else order of appearance; fp first."""
    seen = list(dict.fromkeys(df["method"]))
    try:
        from bench.grid import load_grid

        order = load_grid(grid).method_names() if grid else []
    except Exception:  # noqa: BLE001 - a report of a deleted or renamed grid still renders
        order = []
    ordered = [m for m in order if m in seen] + [m for m in seen if m not in order]
    return sorted(ordered, key=lambda m: m != FP_METHOD)


def shown_metrics(df: pd.DataFrame, wanted: list[str] | None) -> list[str]:
    if wanted:
        bad = [m for m in wanted if m not in METRICS]
        if bad:
            raise UsageError(f"unknown metric(s) {bad}; expected some of {', '.join(METRICS)}")
        return wanted
    return [m for m in METRICS if m in df and df[m].notna().any()]


def aggregate(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (model, method, bits, metric): mean, half-width, seeds."""
    rows = []
    for (model, method, bits), g in df.groupby(["model", "method", "bits"], sort=False):
        for m in metrics:
            mean, half, n = mean_ci(g[m].tolist())
            rows.append(dict(model=model, method=method, bits=bits, metric=m, mean=mean, half=half, n=n))
    return pd.DataFrame(rows, columns=["model", "method", "bits", "metric", "mean", "half", "n"])


def _fmt(mean: float, half: float, latex: bool) -> str:
    if not np.isfinite(mean):
        return "-"
    digits = 4 if abs(mean) < 0.1 else (3 if abs(mean) < 10 else 2)
    s = f"{mean:.{digits}f}"
    if np.isfinite(half):
        s += (r" $\pm$ " if latex else " ± ") + f"{half:.{digits}f}"
    return s


def model_table(agg: pd.DataFrame, model: str, methods: list[str], metrics: list[str], latex: bool = False) -> str:
    """One model's table; FP values repeat under every W/A setting (it has none) and are never bolded."""
    a = agg[agg["model"] == model]
    settings = [b for b in bits_order(a["bits"]) if b != FP_BITS] or [FP_BITS]
    cell = {(r.method, r.bits, r.metric): (r.mean, r.half) for r in a.itertuples()}
    best = {}
    for b in settings:
        for m in metrics:
            vals = [(cell.get((meth, b, m), (math.nan,))[0], meth) for meth in methods if meth != FP_METHOD]
            vals = [v for v in vals if np.isfinite(v[0])]
            if vals:  # ties (at the printed precision) are all bold
                top = _fmt((min if lower_is_better(m) else max)(v for v, _ in vals), math.nan, False)
                best[(b, m)] = {meth for v, meth in vals if _fmt(v, math.nan, False) == top}
    rows = []
    for meth in [m for m in methods if m in set(a["method"])]:
        out = []
        for b in settings:
            for m in metrics:
                mean, half = cell.get((meth, FP_BITS if meth == FP_METHOD else b, m), (math.nan, math.nan))
                s = _fmt(mean, half, latex)
                if meth in best.get((b, m), ()) and s != "-":
                    s = rf"\textbf{{{s}}}" if latex else f"**{s}**"
                out.append(s)
        name = f"{meth} (W32A32)" if meth == FP_METHOD else meth
        rows.append([name.replace("_", r"\_") if latex else name] + out)
    arrow = {True: "↓", False: "↑"} if not latex else {True: r"$\downarrow$", False: r"$\uparrow$"}
    heads = [f"{LABELS[m]}{arrow[lower_is_better(m)]}" for m in metrics]
    if not latex:
        header = ["Method"] + [f"{b} {h}" for b in settings for h in heads]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    k = len(metrics)
    spec = "l" + " ".join("c" * k for _ in settings)
    top = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{b}}}" for b in settings)
    rules = " ".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(settings)))
    body = [r"\begin{tabular}{" + spec + "}", r"\toprule", f"Method & {top} \\\\", rules,
            " & " + " & ".join(heads * len(settings)) + r" \\", r"\midrule"]
    body += [" & ".join(r) + r" \\" for r in rows]
    body += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(body)


# ---- plots -----------------------------------------------------------------------------------------------------------
def _save(fig, path: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".svg")]
    fig.tight_layout()
    fig.savefig(out[0], dpi=120)
    fig.savefig(out[1])
    plt.close(fig)
    return out


def plots(df: pd.DataFrame, agg: pd.DataFrame, grid: str, methods: list[str], metrics: list[str], out: Path,
          store_root: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    pdir = out / "plots"
    for model in dict.fromkeys(df["model"]):
        d, a = df[df["model"] == model], agg[agg["model"] == model]
        settings = [b for b in bits_order(d["bits"]) if b != FP_BITS]
        quant = [m for m in methods if m != FP_METHOD and m in set(d["method"])]
        stem = f"{grid}-{model}"
        # metric vs bit width, one line per method, FP as a dashed reference
        for metric in metrics:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for meth in quant:
                r = a[(a["method"] == meth) & (a["metric"] == metric)].set_index("bits").reindex(settings)
                ax.errorbar(settings, r["mean"], yerr=r["half"].fillna(0), marker="o", capsize=3, label=meth)
            fp = a[(a["method"] == FP_METHOD) & (a["metric"] == metric)]
            if len(fp) and np.isfinite(fp["mean"].iloc[0]):
                ax.axhline(fp["mean"].iloc[0], color="k", ls="--", lw=1, label="fp")
            ax.set(xlabel="bit width (W/A)", ylabel=LABELS[metric], title=f"{model}: {LABELS[metric]} vs bit width")
            ax.legend(fontsize=7)
            made += _save(fig, pdir / f"{stem}-{metric}-vs-bits")
        # quantization time per method (mean over seeds), grouped by bit width
        if quant and settings:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            width = 0.8 / max(len(settings), 1)
            for i, b in enumerate(settings):
                vals = [d[(d["method"] == m) & (d["bits"] == b)]["quant_seconds"].mean() for m in quant]
                ax.bar(np.arange(len(quant)) + i * width, vals, width, label=b)
            ax.set_xticks(np.arange(len(quant)) + width * (len(settings) - 1) / 2, quant, rotation=30, ha="right")
            ax.set(ylabel="quantization time (s)", title=f"{model}: quantization time")
            ax.legend(fontsize=7)
            made += _save(fig, pdir / f"{stem}-quant-time")
        # per-step noise-prediction error vs FP, one panel per bit width
        rec = d[d["eps_mse_per_step"].map(lambda v: v is not None and len(v) > 0)]
        if len(rec):
            fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.5), squeeze=False)
            for ax, b in zip(axes[0], settings):
                for meth in quant:
                    curves = rec[(rec["method"] == meth) & (rec["bits"] == b)]["eps_mse_per_step"]
                    if len(curves):
                        ax.plot(np.mean(np.stack([np.asarray(c) for c in curves]), 0), label=meth)
                ax.set(yscale="log", xlabel="sampling step (0 = noisiest)", ylabel="MSE(eps_q, eps_fp)", title=b)
                ax.legend(fontsize=7)
            made += _save(fig, pdir / f"{stem}-eps-mse-per-step")
        # TDAC allocation: calibration samples per step chosen by each method (first seed)
        alloc = d[d["allocation"].map(lambda v: v is not None and len(v) > 0)]
        if len(alloc):
            firsts = alloc.sort_values(["seed"]).drop_duplicates(["method"])  # one panel per method: first seed/bits
            firsts = firsts.set_index("method").reindex([m for m in methods if m in set(firsts["method"])])
            fig, axes = plt.subplots(len(firsts), 1, figsize=(6, 1.6 * len(firsts) + 0.6), squeeze=False,
                                     sharex=True)
            for ax, (meth, r) in zip(axes[:, 0], firsts.iterrows()):
                a_ = np.asarray(r["allocation"])
                ax.bar(np.arange(len(a_)), a_, width=1.0)
                ax.set_ylabel("samples", fontsize=7)
                ax.set_title(f"{meth} ({r['bits']}): {int(a_.sum())} calibration samples", fontsize=8)
            axes[-1, 0].set_xlabel("sampling step (0 = noisiest)")
            fig.suptitle(f"{model}: calibration samples per step", fontsize=9)
            made += _save(fig, pdir / f"{stem}-allocation")
        made += _speed_figure(a, quant, settings, pdir / f"{stem}-quality-vs-int8-speedup")
        made += _sample_figure(d, methods, settings, store_root, pdir / f"{stem}-samples")
    return made


def _speed_figure(a: pd.DataFrame, quant, settings, path: Path) -> list[Path]:
    """Quality (FID, else digits-FID) against the integer-kernel speed-up over FP, one point per method x bit width
    (mean over seeds, 95% CI bars): the quality/speed trade-off (bench/int8_cell.py)."""
    import matplotlib.pyplot as plt

    quality = next((m for m in ("fid", "digits_fid") if len(a[(a["metric"] == m) & a["mean"].notna()])), None)
    sp = a[(a["metric"] == "int8_speedup") & a["mean"].notna()]
    if quality is None or sp.empty:
        return []
    q = a[a["metric"] == quality].set_index(["method", "bits"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    markers = dict(zip(settings, "os^vD<>p"))
    for meth in quant:
        for r in sp[sp["method"] == meth].itertuples():
            if (meth, r.bits) in q.index:
                qq = q.loc[(meth, r.bits)]
                ax.errorbar(r.mean, qq["mean"], xerr=0 if np.isnan(r.half) else r.half,
                            yerr=0 if np.isnan(qq["half"]) else qq["half"], marker=markers.get(r.bits, "o"),
                            capsize=3, ls="none", label=f"{meth} {r.bits}")
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set(xlabel="integer-kernel speed-up over FP32 (one UNet call)", ylabel=f"{LABELS[quality]} (lower is better)",
           title=f"{LABELS[quality]} vs int8 speed-up")
    ax.legend(fontsize=6)
    return _save(fig, path)


def _sample_figure(d: pd.DataFrame, methods, settings, store_root: Path, path: Path) -> list[Path]:
    """FP and each method x bit width from the same (first) seed, side by side."""
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    seed = d["seed"].min()
    panels = []
    for meth in methods:
        for b in ([FP_BITS] if meth == FP_METHOD else settings):
            r = d[(d["method"] == meth) & (d["bits"] == b) & (d["seed"] == seed)]
            rel = r["sample_grid"].iloc[0] if len(r) else None
            if isinstance(rel, str) and (store_root / rel).is_file():
                panels.append((f"{meth}\n{b}" if meth != FP_METHOD else "fp", imread(store_root / rel)))
    if not panels:
        return []
    cols = min(len(panels), 6)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"samples from seed {seed}", fontsize=9)
    return _save(fig, path)


# ---- the report ------------------------------------------------------------------------------------------------------
def render(out: Path, grid: str | None = None, metrics: list[str] | None = None, make_plots: bool = True) -> Path:
    """Write report.md, tables/*.tex and plots/* under `out` from the store in out/runs; returns report.md."""
    root = runs_dir(out)
    df = read_runs(root, grid)
    if df.empty:
        raise UsageError(f"no results for grid {grid or '(any)'} in {root}; run `python -m bench.run"
                         f"{' --grid ' + grid if grid else ''}` first")
    lines = ["# eda-bench results", ""]
    for g in dict.fromkeys(df["grid"]):
        lines += _grid_section(df[df["grid"] == g], g, out, root, metrics, make_plots)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _grid_section(df, grid, out, root, metrics, make_plots) -> list[str]:
    ok, failed = df[df["status"] == "ok"], df[df["status"] != "ok"]
    methods = method_order(df, grid)
    shown = shown_metrics(ok, metrics)
    agg = aggregate(ok, shown)
    commits = ", ".join(sorted({c[:12] for c in df["git_commit"].dropna() if c})) or "unknown"
    lines = [f"## grid `{grid}`", "",
             f"{len(ok)} cells ok, {len(failed)} failed; runs {', '.join(sorted(df['run_id'].dropna().unique()))}; "
             f"commit {commits}; last cell {df['time'].max():%Y-%m-%d %H:%M} UTC.",
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


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=None, help="only this grid (default: every grid in the store)")
    p.add_argument("--out", default="results", help="results directory holding runs/ (default: results/)")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated metrics to tabulate (default: every one recorded; known: {', '.join(METRICS)})")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    args = p.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    path = render(Path(args.out), args.grid, metrics, args.plots)
    print(f"wrote {path}, {Path(args.out) / 'tables'}/, {Path(args.out) / 'plots'}/")
    return 0


if __name__ == "__main__":
    main()
