"""Paper-style tables from result rows: mean ± 95% t-interval across seeds per (model, method, bits, metric), one
table per model (rows = methods, columns = W/A setting x metric, best quantized method in bold, FP as the reference
row), as Markdown or LaTeX booktabs.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.harness.grid import FP_BITS, FP_METHOD
from bench.metrics.names import LABELS, METRICS, lower_is_better


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
        from bench.harness.grid import load_grid

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
