"""Render the digits methods study from its rows.

    python -m bench.run --grid digits --out DIR          # 114 cells on two models (resumable: same command)
    python -m bench.run --grid digits-converged --out DIR  # its convergence check: 12 cells (optional)
    python -m bench.studies.digits --runs DIR/runs       # -> results/digits-study.md, results/digits-study.parquet,
                                                         #    results/plots/digits-study-*.png
    python -m bench.studies.digits                       # re-render from the committed results/digits-study.parquet

Everything on the page is computed from the stored rows; nothing is typed in. Means carry 95% Student-t intervals
across seeds; comparisons are paired by seed (EDA-DM minus another method on the same seed, so the seed's sample
set and calibration draw cancel). The rows must come from one clean commit (bench.reporting.provenance;
--allow-mixed shows several, each listed).

Convergence: every reconstructing cell records, per unit, whether its loss curve plateaued (eda.convergence). A
method/setting whose cells have an unconverged unit on any seed is shown with its unconverged fraction, and the
page draws no conclusion from it: its paired comparisons read "not judged".

Convergence check: rows of bench/grids/digits-converged.toml (run into the same --out) rerun EDA-DM and Q-Diffusion
at W4A8 under budgets where every unit can plateau; the page shows them in their own section, as the methods
"EDA-DM, longer cap" and "Q-Diffusion, activations to plateau", paired by seed with the study's cells.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import UsageError, cli_main
from bench.harness.store import read_file, read_runs, write_file
from bench.reporting.provenance import require_one_commit, require_one_configuration
from bench.reporting.tables import mean_ci

HERE = Path(__file__).resolve().parents[2] / "results"  # the page, its rows and plots live in results/
GRID = "digits"
MODELS = ["digits-ddpm", "digits-cosine"]
METHODS = ["fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm", "eda-dm:tdac-only", "eda-dm:fbr-only"]
BASELINES = ["rtn", "ptq4dm", "qdiffusion"]
ABLATIONS = ["eda-dm:tdac-only", "eda-dm:fbr-only"]
SETTINGS = ["W4A8", "W3A8", "W8A8"]
# (column, header, scale, decimals); lower is better for all but classes
COLUMNS = [("fid", "FID", 1, 1), ("kid", "KID x1e3", 1e3, 2), ("fid_vs_fp", "FID vs FP", 1, 1),
           ("digits_fid", "digits-FID", 1, 1), ("digits_fid_vs_fp", "digits-FID vs FP", 1, 2),
           ("digits_coverage", "classes", 10, 1), ("eps_mse", "eps MSE x1e3", 1e3, 2)]
# The metrics claims are made on (lower is better): FID against held-out digits (what the paper reports), FID to
# the FP model's samples from the same noise, and the noise-prediction error against FP (results/noise.md: the
# least float-noisy of the three).
PAIRED = [("fid", "FID"), ("fid_vs_fp", "FID vs FP"), ("eps_mse", "eps MSE")]
NAMES = {"rtn": "RTN", "ptq4dm": "PTQ4DM", "qdiffusion": "Q-Diffusion", "eda-dm": "EDA-DM", "fp": "FP",
         "eda-dm:tdac-only": "TDAC only", "eda-dm:fbr-only": "FBR only",
         "eda-dm@plateau": "EDA-DM, longer cap", "qdiffusion@plateau": "Q-Diffusion, activations to plateau"}
# The convergence check (bench/grids/digits-converged.toml): its rows' methods are renamed so that they sit beside
# the study's own cells of the same method without mixing with them.
CHECK_GRID = "digits-converged"
CHECK_METHODS = {"eda-dm": "eda-dm@plateau", "qdiffusion": "qdiffusion@plateau"}
CHECK_BITS = "W4A8"


# ---- reading rows ---------------------------------------------------------------------------------------------------

def info_of(row) -> dict:
    try:
        return json.loads(row["info"]) if isinstance(row["info"], str) and row["info"] else {}
    except json.JSONDecodeError:
        return {}


def info_value(info: dict, key: str):
    """A nested value of a row's info JSON; values JSON could not hold were stored as their Python repr (None if
    that does not parse)."""
    v = info.get(key)
    if isinstance(v, str):
        import ast

        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return None
    return v


def stage_reports(info: dict) -> list[dict]:
    """The reconstruction stage reports a row recorded (QuantResult.info["recon"]); [] without reconstruction."""
    recon = info_value(info, "recon") or []
    return recon if isinstance(recon, list) else [recon]


def unit_losses(info: dict) -> list[dict]:
    """Every reconstructed unit's loss summary (eda.convergence.summarize), over all stages, with stage and name."""
    out = []
    for st in stage_reports(info):
        for name, u in (st.get("units") or {}).items():
            loss = u.get("loss") or {}
            if loss.get("iters"):
                out.append({"stage": st.get("stage", ""), "unit": name, **loss,
                            "mse_before": u.get("mse_before"), "mse_after": u.get("mse_after")})
    return out


def with_convergence(ok: pd.DataFrame) -> pd.DataFrame:
    """ok rows plus `units` and `unconverged` (0 and 0 for methods that reconstruct nothing), counted by the rule
    the method itself records (eda.registry.convergence) from the row's stage reports."""
    from eda.registry import convergence

    ok = ok.copy()
    counts = [convergence(stage_reports(info_of(r))) for _, r in ok.iterrows()]
    ok["units"], ok["unconverged"] = [c["units"] for c in counts], [c["unconverged"] for c in counts]
    return ok


# ---- statistics -----------------------------------------------------------------------------------------------------
def cell(values, scale=1.0, dec=1) -> str:
    m, h, n = mean_ci([v * scale for v in values if v is not None and np.isfinite(v)])
    if n == 0:
        return "-"
    return f"{m:.{dec}f}" + (f" ± {h:.{dec}f}" if np.isfinite(h) else "")


def paired(d: pd.DataFrame, a: str, b: str, bits: str, metric: str) -> tuple[float, float, int]:
    """Mean, 95% half-width and n of (a - b) over the seeds present for both (one model's rows)."""
    x = d[(d.method == a) & (d.bits == bits)].set_index("seed")[metric]
    y = d[(d.method == b) & (d.bits == bits)].set_index("seed")[metric]
    common = sorted(set(x.index) & set(y.index))
    return mean_ci([float(x[s] - y[s]) for s in common])


def converged(d: pd.DataFrame, method: str, bits: str) -> bool:
    g = d[(d.method == method) & (d.bits == bits)]
    return len(g) > 0 and int(g.unconverged.sum()) == 0


def judge(d: pd.DataFrame, a: str, b: str, bits: str, metric: str) -> tuple[str, float, float, int]:
    """('better' | 'worse' | 'tie' | 'one seed' | 'unconverged' | 'missing', mean, half-width, n) for a - b."""
    m, h, n = paired(d, a, b, bits, metric)
    if n == 0:
        return "missing", m, h, n
    if not (converged(d, a, bits) or a == "fp") or not (converged(d, b, bits) or b == "fp"):
        return "unconverged", m, h, n
    if n < 2 or not np.isfinite(h):
        return "one seed", m, h, n
    return interval_side(m, h), m, h, n


def interval_side(m: float, h: float) -> str:
    """'better' when the interval m ± h lies below 0, 'worse' above, 'tie' when it contains 0."""
    return "better" if m + h < 0 else "worse" if m - h > 0 else "tie"


def fmt_diff(metric: str, m: float, h: float) -> str:
    scale = 1e3 if metric == "eps_mse" else 1.0
    unit = "e-3" if metric == "eps_mse" else ""
    return f"{m * scale:+.2f}{unit} ± {h * scale:.2f}{unit}" if np.isfinite(h) else f"{m * scale:+.2f}{unit}"


def verdict_cell(v: tuple[str, float, float, int], metric: str) -> str:
    kind, m, h, n = v
    if kind == "missing":
        return "-"
    text = fmt_diff(metric, m, h)
    return {"better": f"**{text}** (better)", "worse": f"{text} (worse)", "tie": f"{text} (no difference)",
            "one seed": f"{text} (one seed)", "unconverged": f"{text} (not judged: unconverged units)"}[kind]


# ---- page sections --------------------------------------------------------------------------------------------------
def planned_cells(grid: str = GRID):
    from bench.harness.grid import load_grid

    return load_grid(grid).cells()


def _seeds(seeds: list[int]) -> str:
    """'seed 2' or 'seeds 0, 1, 2'."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def progress_lines(ok: pd.DataFrame, failed: pd.DataFrame, planned, grid: str = GRID) -> list[str]:
    """Cells of the grid file not yet in the rows (the grid resumes and runs only these), matched on the cell key:
    the full configuration (samples, sampler, knobs, batch size), not just model/method/bits/seed."""
    have = set(ok.cell_key)
    missing = [c for c in planned if c.key not in have]
    lines = [f"{len(planned) - len(missing)} of {len(planned)} planned cells done, {len(failed)} failed."]
    if missing:
        groups: dict = {}
        for c in missing:
            groups.setdefault((c.model, c.method, c.bits), []).append(c.seed)
        lines += ["", f"**Not yet run** (`python -m bench.run --grid {grid} --out DIR` with the same DIR resumes and "
                  "runs only these): " + "; ".join(f"{m} {NAMES.get(me, me)} {b} ({_seeds(s)})"
                                                 for (m, me, b), s in groups.items()) + "."]
    if len(failed):
        lines += ["", "**Failed cells**: " + "; ".join(f"{r.model} {r.method} {r.bits} seed {r.seed}: {r.error}"
                                                      for r in failed.itertuples()) + "."]
    return lines + [""]


def table_lines(d: pd.DataFrame, bits: str, methods: list[str] = METHODS) -> list[str]:
    fp = d[d.method == "fp"]
    head = "| method | " + " | ".join(h for _, h, _, _ in COLUMNS) + " | unconverged units | quant. min |"
    lines = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for m in methods:
        g = fp if m == "fp" else d[(d.method == m) & (d.bits == bits)]
        if g.empty:
            continue
        vals = [cell(g[c].tolist(), s, dec) if c in g else "-" for c, _, s, dec in COLUMNS]
        units = int(g.units.sum())
        unconv = f"{int(g.unconverged.sum())} of {units}" if units else "-"
        qmin = "-" if m == "fp" else f"{g.quant_seconds.mean() / 60:.1f}"
        seeds = f" ({len(g)} seed{'s' if len(g) != 1 else ''})" if len(g) < 3 else ""
        lines.append(f"| {NAMES.get(m, m)}{seeds} | " + " | ".join(vals) + f" | {unconv} | {qmin} |")
    return lines + [""]


def paired_lines(d: pd.DataFrame, bits: str, subject: str = "eda-dm",
                 others: list[str] = BASELINES + ABLATIONS) -> list[str]:
    others = [b for b in others if not d[(d.method == b) & (d.bits == bits)].empty]
    if d[(d.method == subject) & (d.bits == bits)].empty or not others:
        return []
    name = NAMES[subject]
    lines = [f"{name} minus each other method at {bits}, paired by seed (negative: {name} lower, i.e. better):", "",
             "| other method | " + " | ".join(h for _, h in PAIRED) + " |", "|---" * (len(PAIRED) + 1) + "|"]
    for b in others:
        lines.append(f"| {NAMES[b]} | " + " | ".join(verdict_cell(judge(d, subject, b, bits, m), m)
                                                    for m, _ in PAIRED) + " |")
    return lines + [""]


def findings(d: pd.DataFrame, subject: str = "eda-dm", others: list[str] = BASELINES + ABLATIONS,
             settings: list[str] = SETTINGS) -> list[str]:
    """The discussion, generated: per setting, against each baseline and each ablation, which metrics separate."""
    out = []
    for bits in settings:
        if d[(d.method == subject) & (d.bits == bits)].empty:
            continue
        parts = []
        for b in others:
            if d[(d.method == b) & (d.bits == bits)].empty:
                continue
            vs = {m: judge(d, subject, b, bits, m) for m, _ in PAIRED}
            kinds = {v[0] for v in vs.values()}
            label = dict(PAIRED)
            if kinds & {"unconverged"}:
                bad = [x for x in (subject, b) if not converged(d, x, bits)]
                parts.append(f"against {NAMES[b]}: not judged ({' and '.join(NAMES[x] for x in bad)} had unconverged "
                             "units)")
                continue
            if kinds <= {"one seed", "missing"}:
                parts.append(f"against {NAMES[b]}: one seed only, not judged")
                continue
            said = []
            for kind, word in (("better", "lower"), ("worse", "higher"), ("tie", "no difference")):
                ms = [f"{label[m]} {fmt_diff(m, v[1], v[2])}" for m, v in vs.items() if v[0] == kind]
                if ms:
                    said.append(f"{word} on {', '.join(ms)}" if kind != "tie" else f"no difference on {', '.join(ms)}")
            what = " (ablation)" if b in ABLATIONS else ""
            parts.append(f"against {NAMES[b]}{what}: " + "; ".join(said))
        if parts:
            n = int(d[(d.method == subject) & (d.bits == bits)].seed.nunique())
            seeds = f"{n} paired seed" + ("s" if n != 1 else "")
            out.append(f"- **{bits}** ({NAMES[subject]} minus the other, {seeds}): " + ". ".join(
                p[0].upper() + p[1:] for p in parts) + ".")
    return out


def ranking_lines(ok: pd.DataFrame) -> list[str]:
    """Does the ranking hold beyond one network? Mean FID vs FP per method and setting, ordered, per model."""
    lines = []
    for bits in SETTINGS:
        orders = {}
        for model in MODELS:
            d = ok[(ok.model == model) & (ok.bits == bits) & ok.method.isin(BASELINES + ["eda-dm"])]
            means = d.groupby("method").fid_vs_fp.mean().sort_values()
            if len(means) == len(BASELINES) + 1:
                orders[model] = list(means.index)
        if len(orders) == len(MODELS):
            same = len({tuple(o) for o in orders.values()}) == 1
            desc = "; ".join(f"{m}: {' < '.join(NAMES[x] for x in o)}" for m, o in orders.items())
            lines.append(f"- {bits}, methods ordered by mean FID vs FP (best first): {desc}. "
                         + ("The same order on both models." if same else "The order differs between the models."))
    return lines


UNCONVERGED_LISTED = 6  # per method and setting; the rest are counted


def budget_lines(d: pd.DataFrame, methods: list[str] = METHODS[1:]) -> list[str]:
    """Iterations each reconstructing method actually ran per unit (from the recorded loss summaries), then which
    units had not plateaued when their budget ran out and how far their loss still moved: a reader can tell a unit
    still falling steeply from one creeping down by a few percent."""
    lines = ["| method | setting | calibration samples | iterations per unit (cap) | run per unit: min / median / max "
             "| unconverged units | quant. min (mean) |", "|---|---|---|---|---|---|---|"]
    listed = []
    for m in methods:
        for bits in SETTINGS:
            g = d[(d.method == m) & (d.bits == bits)].sort_values("seed")
            if g.empty:
                continue
            seeded = [(int(r.seed), u) for _, r in g.iterrows() for u in unit_losses(info_of(r))]
            units = [u for _, u in seeded]
            calib = ", ".join(str(int(c)) for c in sorted(g.calib_size.dropna().unique())) or "-"
            if not units:
                lines.append(f"| {NAMES[m]} | {bits} | {calib} | no reconstruction | - | - | "
                             f"{g.quant_seconds.mean() / 60:.1f} |")
                continue
            caps = " + ".join(f"{st} {max(u['budget'] for u in units if u['stage'] == st)}"
                              for st in dict.fromkeys(u["stage"] for u in units))
            it = np.array([u["iters"] for u in units])
            bad = [(seed, u) for seed, u in seeded if not u.get("plateaued")]
            lines.append(f"| {NAMES[m]} | {bits} | {calib} | {caps} | {it.min()} / {int(np.median(it))} / {it.max()} "
                         f"| {len(bad)} of {len(units)} | {g.quant_seconds.mean() / 60:.1f} |")
            if bad:
                shown = [f"seed {seed} {u['unit']} ({u['stage']}, {u['iters']} iterations): loss {u['first']:.3g} to "
                         f"{u['last']:.3g} ({_change(u['first'], u['last'])})" for seed, u in bad[:UNCONVERGED_LISTED]]
                more = f"; and {len(bad) - UNCONVERGED_LISTED} more" if len(bad) > UNCONVERGED_LISTED else ""
                listed.append(f"- Unconverged, {NAMES[m]} {bits}: " + "; ".join(shown) + more + ".")
            listed += effect_lines(f"{NAMES[m]} {bits}", units)
    return lines + [""] + (listed + [""] if listed else [])


def effect_lines(label: str, units: list[dict]) -> list[str]:
    """Whether reconstruction helped each unit: its output MSE against FP on the calibration inputs (eda.recon:
    mse_before with the initial quantizers, mse_after with the learned, hard-rounded ones), counted per stage, and
    how many curves ended above their first window. An AdaRound stage trades reconstruction loss for hard rounding
    as its temperature anneals, so its curve can rise at the end; the plateau rule counts a curve with no decrease
    as plateaued, and the MSE count is what says whether such a unit still improved."""
    judged = [u for u in units if u.get("mse_before") is not None and u.get("mse_after") is not None]
    if not judged:
        return []
    stages = list(dict.fromkeys(u["stage"] for u in judged))
    total = Counter(u["stage"] for u in judged)
    better = Counter(u["stage"] for u in judged if u["mse_after"] < u["mse_before"])
    rose = Counter(u["stage"] for u in judged if u["last"] > u["first"])
    per = [f"{st} {better[st]} of {total[st]}" for st in stages]
    rose_txt = ", ".join(f"{st} {rose[st]}" if len(stages) > 1 else str(rose[st]) for st in stages if rose[st])
    return [f"- Effect, {label}: unit output MSE against FP lower after reconstruction than before in "
            f"{better.total()} of {len(judged)} units"
            + (f" ({', '.join(per)})" if len(stages) > 1 else "")
            + (f"; loss curves ending above their first window: {rose_txt}" if rose_txt else "") + "."]


def _change(first: float, last: float) -> str:
    """Relative change of a loss, first window to last, e.g. '-6%'."""
    return f"{(last - first) / first:+.0%}" if first else "n/a"


LOSS_PLOT_METHODS = ["eda-dm", "qdiffusion", *ABLATIONS, "ptq4dm"]


def loss_curve_plot(d: pd.DataFrame, model: str, bits: str, out: Path,
                    methods: list[str] = LOSS_PLOT_METHODS) -> Path | None:
    """One cell per reconstructing method (the lowest seed): every unit's loss curve (window means, divided by the
    first), x = iteration; plateaued units solid, unconverged dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for m in methods:
        g = d[(d.method == m) & (d.bits == bits)].sort_values("seed")
        if not g.empty and unit_losses(info_of(g.iloc[0])):
            picks.append((m, g.iloc[0]))
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(max(3.6 * len(picks), 5.4), 3.0), squeeze=False, sharey=True)
    for ax, (m, r) in zip(axes[0], picks):
        units = unit_losses(info_of(r))
        for u in units:
            c = [v for v in (u.get("curve") or []) if v is not None]
            if len(c) < 2 or not c[0]:
                continue
            x = np.linspace(u["iters"] / len(c), u["iters"], len(c))
            ax.plot(x, np.asarray(c) / c[0], lw=0.8, alpha=0.7, ls="-" if u.get("plateaued") else "--")
        bad = sum(not u.get("plateaued") for u in units)
        ax.set_title(f"{NAMES[m]} (seed {r.seed}): {bad}/{len(units)} unconverged", fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("loss / first window", fontsize=8)
    fig.suptitle(f"{model} {bits}: reconstruction loss per unit (dashed: no plateau)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def tdac_plot(d: pd.DataFrame, model: str, out: Path) -> str | None:
    from eda.tdac import plot_allocation

    rows = d[d.method == "eda-dm"].sort_values(["bits", "seed"])
    for _, r in rows.iterrows():
        info = info_of(r)
        tdac, alloc = info_value(info, "tdac"), info.get("allocation")
        if isinstance(alloc, str):
            alloc = json.loads(alloc)
        if tdac and alloc:
            out.parent.mkdir(parents=True, exist_ok=True)
            plot_allocation(tdac, alloc, str(out), title=f"TDAC on {model}: N = {sum(alloc)}, seed {r.seed}")
            desc = (f"{sum(alloc)} samples over {len(alloc)} steps, n_t from {min(alloc)} to {max(alloc)} "
                    f"(uniform would be {sum(alloc) / len(alloc):.1f})")
            return desc + _density_regime(tdac, info_value(info, "config") or {})
    return None


def _density_regime(tdac: dict, config: dict) -> str:
    """How many step pairs lie within TDAC's density radius, and what that means (eda.tdac: at 0 or 1 the density
    is equal at every step and drops out, so the allocation follows diversity alone)."""
    frac, radius = tdac.get("dense_fraction"), config.get("radius")
    if frac is None or radius is None:
        return ""
    text = (f"; density radius r = {radius:g}: {frac:.0%} of step pairs within it (pairwise feature MSE median "
            f"{tdac.get('mse_median', float('nan')):.3g}, max {tdac.get('mse_max', float('nan')):.3g})")
    if frac in (0.0, 1.0):
        text += (", so density is the same at every step and the allocation follows diversity alone (the TDAC-only "
                 "ablation then tests diversity-weighted calibration)")
    return text


def load_rows(runs: Path | None) -> pd.DataFrame:
    """The study's rows and those of its convergence check (CHECK_GRID), from a results store or the committed file."""
    if runs is not None:
        df = pd.concat([f for f in (read_runs(runs, grid=GRID), read_runs(runs, grid=CHECK_GRID)) if not f.empty]
                       or [read_runs(runs, grid=GRID)], ignore_index=True)
        if df[df.grid == GRID].empty:
            raise SystemExit(f"error: no rows of grid {GRID!r} under {runs}; run `python -m bench.run --grid digits "
                             "--out DIR` and pass --runs DIR/runs")
        return df
    path = HERE / "digits-study.parquet"
    if not path.is_file():
        raise SystemExit("error: no committed rows at results/digits-study.parquet; pass --runs DIR/runs")
    return read_file(path)


def budget_effect_lines(d: pd.DataFrame, bits: str) -> list[str]:
    """Each rerun method minus the study's cell of the same method, paired by seed: what the longer budget changed
    (the unconverged units' share of the result), not a comparison of methods."""
    rows = []
    for m, rerun in CHECK_METHODS.items():
        if d[(d.method == m) & (d.bits == bits)].empty or d[(d.method == rerun) & (d.bits == bits)].empty:
            continue
        vals = []
        for metric, _ in PAIRED:
            mean, h, n = paired(d, rerun, m, bits, metric)
            word = "" if n < 2 or not np.isfinite(h) else \
                {"better": " (lower)", "worse": " (higher)", "tie": " (no difference)"}[interval_side(mean, h)]
            vals.append(fmt_diff(metric, mean, h) + word if n else "-")
        rows.append(f"| {NAMES[rerun]} minus {NAMES[m]} | " + " | ".join(vals) + " |")
    if not rows:
        return []
    return ["What the longer budget changed: the rerun minus the study's cell of the same method, paired by seed:", "",
            "| difference | " + " | ".join(h for _, h in PAIRED) + " |", "|---" * (len(PAIRED) + 1) + "|", *rows, ""]


def check_lines(both: pd.DataFrame, ok_check: pd.DataFrame, failed: pd.DataFrame, planned, out_dir: Path) -> list[str]:
    """The convergence check's section: its cells beside the study's at CHECK_BITS, EDA-DM (longer cap) paired with
    the baselines by the study's rule, and what the longer budgets changed."""
    subject, qdiff = CHECK_METHODS["eda-dm"], CHECK_METHODS["qdiffusion"]
    lines = ["## Convergence check: every unit run to its plateau", "",
             "Under the study's budgets some units had not plateaued when their budget ran out, and the sections "
             f"above draw no conclusion from those cells. bench/grids/{CHECK_GRID}.toml reruns EDA-DM and Q-Diffusion "
             f"at {CHECK_BITS} under budgets where every unit can plateau: EDA-DM with a longer cap (*{NAMES[subject]}*)"
             f", Q-Diffusion with its activation stage stopped on its plateau instead of after a fixed count "
             f"(*{NAMES[qdiff]}*); the caps as run are in the budget section. Seeds, calibration draws, samples and "
             "sampler equal the study's, so these cells pair by seed with its FP, RTN and PTQ4DM cells, and the same "
             "rule applies: a conclusion only where every unit of both cells plateaued.", "",
             *progress_lines(ok_check, failed, planned, CHECK_GRID)]
    for model in MODELS:
        d = both[both.model == model]
        if d[d.method.isin(list(CHECK_METHODS.values()))].empty:
            continue
        lines += [f"### {model} {CHECK_BITS}", "",
                  *table_lines(d, CHECK_BITS, ["fp", "rtn", "ptq4dm", "qdiffusion", qdiff, "eda-dm", subject]),
                  *paired_lines(d, CHECK_BITS, subject, ["rtn", "ptq4dm", qdiff]),
                  *budget_effect_lines(d, CHECK_BITS)]
        found = findings(d, subject, ["rtn", "ptq4dm", qdiff], [CHECK_BITS])
        if found:
            lines += ["Generated from the paired intervals above, as in the study's sections:", "", *found, ""]
        p = loss_curve_plot(d, model, CHECK_BITS, out_dir / "plots" / f"digits-study-{model}-{CHECK_BITS}-loss-check.png",
                            [subject, qdiff])
        if p:
            lines += [f"![{model} {CHECK_BITS} loss curves, convergence check](plots/{p.name})", ""]
    return lines


def render(df: pd.DataFrame, allow_mixed: bool, out_dir: Path = HERE) -> str:
    checks = df[df.grid == CHECK_GRID]  # the convergence check's rows (bench/grids/digits-converged.toml)
    df = df[df.grid != CHECK_GRID]
    planned, check_planned = planned_cells(), planned_cells(CHECK_GRID)
    keys, check_keys = {c.key for c in planned}, {c.key for c in check_planned}
    # rows of another configuration than the grid files
    foreign = pd.concat([df[~df.cell_key.isin(keys)], checks[~checks.cell_key.isin(check_keys)]])
    df, checks = df[df.cell_key.isin(keys)], checks[checks.cell_key.isin(check_keys)]
    ok = with_convergence(df[df.status == "ok"])
    failed = df[df.status != "ok"]
    ok_check = with_convergence(checks[checks.status == "ok"])
    ok_check["method"] = ok_check.method.map(lambda m: CHECK_METHODS.get(m, m))
    failed_check = checks[checks.status != "ok"]
    if ok.empty:
        raise UsageError(f"none of the {len(foreign)} rows has the configuration of bench/grids/digits.toml (cell keys "
                         "differ: other samples, budgets or knobs); run `python -m bench.run --grid digits` as is")
    both = pd.concat([ok, ok_check], ignore_index=True)
    source = require_one_commit(both, "digits study", allow_mixed)
    require_one_configuration(both, "digits study")
    seeds = sorted(ok.seed.unique())
    samples = sorted(int(s) for s in ok.samples.dropna().unique())
    n_cells = f"{len(ok)} cells" + (f" + {len(ok_check)} of its convergence check" if len(ok_check) else "")
    lines = ["# Digits study: EDA-DM against its baselines on two digits models", "",
             f"Rows from {source} · {n_cells} · seeds {', '.join(map(str, seeds))} · "
             f"{' / '.join(map(str, samples))} samples per cell · regenerate: `python -m bench.run --grid digits "
             "--out DIR && python -m bench.studies.digits --runs DIR/runs`", "",
             *progress_lines(ok, failed, planned),
             *([f"{len(foreign)} rows of another configuration (other samples, budgets or knobs than "
                f"bench/grids/digits.toml or {CHECK_GRID}.toml) are left out.", ""] if len(foreign) else []),
             "Each entry is the mean over seeds ± the 95% Student-t half-width (3 seeds: t = 4.30). FID and KID use "
             "Inception features against the 360 held-out digits; *vs FP* compares with the FP model's samples from "
             "the same seed and initial noise; digits-FID uses the small digits classifier "
             "(bench/metrics/classifier.py); eps MSE is the noise prediction's error against FP on held-out noise. "
             "Budgets as set in bench/grids/digits.toml and as run are in the last section. Quantization time is one "
             "worker (one thread) on a shared 2-core CPU.", ""]
    for model in MODELS:
        d = ok[ok.model == model]
        if d.empty:
            continue
        lines += [f"## {model}", ""]
        for bits in SETTINGS:
            if d[d.bits == bits].empty:
                continue
            lines += [f"### {bits}", "", *table_lines(d, bits), *paired_lines(d, bits)]
        found = findings(d)
        if found:
            lines += [f"### What the {model} rows show", "",
                      "Generated from the paired intervals above: *lower/higher* means the 95% interval of EDA-DM "
                      "minus the other method lies below/above 0; *no difference* means it contains 0.", "", *found, ""]
        plots = out_dir / "plots"
        for bits in ("W4A8", "W3A8"):
            p = loss_curve_plot(d, model, bits, plots / f"digits-study-{model}-{bits}-loss.png")
            if p:
                lines += [f"![{model} {bits} loss curves](plots/{p.name})", ""]
        desc = tdac_plot(d, model, plots / f"digits-study-{model}-tdac.png")
        if desc:
            lines += [f"![TDAC allocation on {model}](plots/digits-study-{model}-tdac.png)", "",
                      f"TDAC on {model}: {desc}.", ""]
    rank = ranking_lines(ok)
    if rank:
        lines += ["## Does the ranking hold beyond one network?", "", *rank, ""]
    if len(ok_check) or len(failed_check):
        lines += check_lines(both, ok_check, failed_check, check_planned, out_dir)
    lines += ["## Budgets as run", "",
              "Reconstruction under `budget = \"converged\"` stops a unit once its loss has plateaued "
              "(eda.convergence: the second half of the curve brought under 10% of its decrease), capped by the "
              "official count; Q-Diffusion runs a fixed 10% of its official count because its AdaRound temperature "
              "schedule spans the whole budget (bench/grids/digits.toml)."
              + (f" The convergence check's budgets are set in bench/grids/{CHECK_GRID}.toml." if len(ok_check) else "")
              + " *Effect* counts the units whose output MSE against FP on the calibration inputs fell from before "
              "reconstruction (initial quantizers) to after (learned, hard-rounded ones). An AdaRound stage trades "
              "reconstruction loss for hard rounding as its temperature anneals, so its curve can end above its start; "
              "the plateau rule counts a curve with no decrease as plateaued, and the effect count says whether such "
              "a unit still improved.",
              ""]
    for model in MODELS:
        d = both[both.model == model]
        if not d.empty:
            lines += [f"**{model}**", "", *budget_lines(d, METHODS[1:] + list(CHECK_METHODS.values()))]
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.studies.digits", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=None,
                    help="a results store (DIR/runs of `bench.run --grid digits --out DIR`); its rows replace "
                         "results/digits-study.parquet. Default: re-render from that file")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="render rows of several commits (or a dirty tree) together, every commit listed")
    args = ap.parse_args(argv)
    df = load_rows(args.runs)
    text = render(df, args.allow_mixed)
    if args.runs is not None:
        write_file(df, HERE / "digits-study.parquet")
    (HERE / "digits-study.md").write_text(text)
    print(f"wrote {HERE / 'digits-study.md'} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
