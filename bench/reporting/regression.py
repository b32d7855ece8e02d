"""The regression check's rule and comparison (`python -m bench.check` is its command line; its help and the
module docstring of bench/check.py state the rule and where the windows come from)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.errors import UsageError
from bench.metrics.names import LABELS, METRICS, lower_is_better
from bench.reporting.provenance import CONFIG_FIELDS

K_CI = 1.0
BOUNDED = frozenset({"precision", "recall", "digits_coverage", "digits_confidence"})  # in [0, 1]: absolute only
# (abs, rel) window per metric; why these numbers: the docstring of bench/check.py and results/noise.md.
TOLERANCES: dict[str, tuple[float, float]] = {
    # measured on the smoke grid (results/noise.md): about 2x the largest spread between two float outcomes of a cell
    "fid": (1.5, 0.10),  # spread 4.1%
    "digits_fid": (1.0, 0.50),  # spread 24%
    "digits_fid_vs_fp": (1.0, 3.0),  # spread 142% (EDA-DM W4A8, 128 samples): catches a collapse only
    "digits_coverage": (0.05, 0.0),  # never moved; one class of ten is 0.1
    "digits_confidence": (0.02, 0.0),  # spread 0.005
    "eps_mse": (1e-5, 0.08),  # spread 3.6%: the metric with the check's power
    "mse_vs_fp": (1e-5, 0.8),  # spread 40%
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
            from bench.harness.grid import load_grid

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
    # A cell is compared only with the same configuration (samples, sampler, method knobs): a run with other
    # settings is reported, never averaged in. The batch size is not part of it here: it moves results at float
    # level only, which the windows were measured to cover (results/noise.md, variant batch=32).
    ref_by = ref.set_index(CELL)
    ok_cur = cur[cur["status"] == "ok"].set_index(CELL)
    for key in ref_by.index.intersection(ok_cur.index):
        r, c = ref_by.loc[key], ok_cur.loc[key]
        diff = config_diff(r, c)
        if diff:
            problems.append(dict(zip(CELL, key), metric="-", reference="-", current="-", worse_by="-",
                                 tolerance="-", reason="configuration differs from the reference: " + diff))
            ok_cur = ok_cur.drop(index=key)
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


def config_diff(ref_row, cur_row) -> str:
    """'samples 128 -> 256, overrides {...} -> {...}': the recorded settings in which two rows of a cell differ
    ('' when none does; a field missing on either side is not compared)."""
    def val(row, f):
        v = row.get(f)
        return None if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else str(v)

    diffs = [f"{f} {val(ref_row, f)} -> {val(cur_row, f)}" for f in CONFIG_FIELDS
             if val(ref_row, f) is not None and val(cur_row, f) is not None and val(ref_row, f) != val(cur_row, f)]
    return ", ".join(diffs)


def _f(x: float) -> str:
    return "NaN" if not np.isfinite(x) else f"{x:.4g}"


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


