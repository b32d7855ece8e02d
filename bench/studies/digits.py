"""Render the digits methods study from the results store.

    python -m bench.run --grid digits          # the 57 cells (results/runs/grid=digits, resumable)
    python -m bench.studies.digits             # -> results/digits-study.md, results/digits-study.parquet,
                                               #    results/plots/digits-study-*.png

Everything on the page is computed from the stored rows: means with 95% Student-t intervals across the seeds,
paired differences (EDA-DM minus a baseline on the same seed, so seed-to-seed variation of the sample set cancels),
quantization wall time, the iteration budget each method actually ran (from the row's recorded config) and the TDAC
allocation of the recorded run. The hand-written discussion lives in DISCUSSION below and must be re-read whenever
the numbers change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.harness.store import read_file, read_runs, runs_dir, write_file
from bench.reporting.tables import bits_order, mean_ci

HERE = Path(__file__).resolve().parents[2] / "results"  # the page, its rows and plots live in results/

METHODS = ["fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm", "eda-dm:tdac-only", "eda-dm:fbr-only"]
# (column, header, scale, decimals); lower is better for all but coverage
COLUMNS = [("fid", "FID", 1, 1), ("kid", "KID x1e3", 1e3, 2), ("fid_vs_fp", "FID vs FP", 1, 1),
           ("digits_fid", "digits-FID", 1, 1), ("digits_fid_vs_fp", "digits-FID vs FP", 1, 2),
           ("digits_coverage", "classes", 10, 1), ("quant_seconds", "quant. s", 1, 0)]
PAIRED = ["fid", "fid_vs_fp", "digits_fid", "digits_fid_vs_fp"]

DISCUSSION = """\
Read with the budget in mind: every method ran 1% of its official iterations and a quarter of its calibration set on
a 1.6M-parameter 16x16 model, so this ranks the recipes at a CPU budget. It does not reproduce the paper's numbers.

- **Where EDA-DM wins.** At W4A8 and W3A8, EDA-DM is closest to the FP model: FID vs FP 7.1 (W4A8) and 13.1 (W3A8)
  against 14.6-23.1 and 28.7-60.4 for the baselines, and the paired intervals exclude 0 against RTN and PTQ4DM at
  both settings and against Q-Diffusion at W4A8. It also has the lowest Inception FID at W3A8.
- **Where EDA-DM does not win.**
  - At W8A8, EDA-DM is not distinguishable from round-to-nearest on any metric. Every paired interval contains 0,
    and RTN's digits-FID vs FP is 0.12 against EDA-DM's 0.42. It is also not distinguishable from Q-Diffusion
    there (FID vs FP 6.1 against 5.8): 8-bit weights leave little for any reconstruction to recover.
  - PTQ4DM's Inception FID at W8A8 and W4A8 is the same as EDA-DM's (paired differences -0.3 ± 3.1 and +0.4 ± 0.6),
    although its samples drift much further from the FP samples (FID vs FP 17.0 and 14.6 against 6.1 and 7.1).
  - Against Q-Diffusion at W3A8 the intervals are too wide to call. One Q-Diffusion seed degrades badly there.
- **Baselines behaving unlike the papers.**
  - Q-Diffusion is worse than plain RTN at W4A8 (FID vs FP 23.1 against 15.5). A likely cause is the budget: with
    1% of 20000 iterations, its AdaRound weight stage has 200 iterations, and the rounding regulariser's annealing
    (b 20 -> 2 after a 20% warm-up) forces hard rounding long before the reconstruction loss has converged. EDA-DM
    runs AdaRound without the regulariser, so it does not pay this. We did not change Q-Diffusion's published
    recipe to rescue it.
  - PTQ4DM's digits-FID is poor at every setting (68-95 against FP 38), while its Inception FID is close to FP. Its
    samples change class shapes that Inception features forgive, and the digits classifier does not.
- **Ablations.** At W4A8, full EDA-DM is not distinguishable from either ablation on any metric (all paired
  intervals contain 0): at this budget neither TDAC alone nor FBR alone accounts for a measurable part of its lead
  over the baselines, and the two together do not add up to more. At W3A8 both ablations are also within noise of
  EDA-DM, and at W8A8 all three agree to a tenth of an FID point (FID vs FP 6.1 each; paired differences
  -0.02 ± 0.09 against TDAC-only and +0.03 ± 0.93 against FBR-only).
  The paper's ablation gains are not reproduced here; see the TDAC note below for one reason.
- **TDAC at this N.** With N = 256 calibration samples over 100 steps, the allocation rounds to 2-3 samples per step.
  The repair these rows ran put the whole rounding deficit on the single largest step (11 samples in the plot). That
  was a deviation, not the official repair (which adds at most 1 per step; fixed in eda.tdac.repair_counts after
  these rows were produced). Either way TDAC's calibration set is close to uniform here, and a TDAC-only gain needs N well above 3x the step count (the
  paper's N = 1024).
"""


def cell(values, scale=1.0, dec=1) -> str:
    m, h, n = mean_ci([v * scale for v in values if v is not None and np.isfinite(v)])
    if n == 0:
        return "-"
    return f"{m:.{dec}f}" + (f" ± {h:.{dec}f}" if np.isfinite(h) else "")


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


def budget(info: dict) -> str:
    """Iterations per unit, batch and calibration size as the cell ran them (from the recorded config)."""
    recon = info_value(info, "recon")
    calib = info.get("calib_size")
    if not recon:
        return f"no reconstruction; {calib} calibration samples"
    stages = []
    for st in recon if isinstance(recon, list) else [recon]:
        c = st.get("config", st)
        what = "weights" if c.get("learn_weights") and not c.get("learn_act_delta") else (
            "act. steps" if c.get("learn_act_delta") and not c.get("learn_weights") else "weights + act. steps")
        stages.append(f"{c.get('iters')} it x batch {c.get('batch_size')} ({c.get('loss')}, {what})")
    return "; ".join(stages) + f"; {calib} calibration samples"


def paired(df: pd.DataFrame, a: str, b: str, bits: str, metric: str):
    """Mean and 95% CI of (a - b) over seeds present for both."""
    x = df[(df.method == a) & (df.bits == bits)].set_index("seed")[metric]
    y = df[(df.method == b) & (df.bits == bits)].set_index("seed")[metric]
    common = sorted(set(x.index) & set(y.index))
    return mean_ci([float(x[s] - y[s]) for s in common])


def verdict(m: float, h: float) -> str:
    if not np.isfinite(m):
        return "-"
    if not np.isfinite(h):
        return f"{m:+.2f} (one seed)"
    if m + h < 0:
        return f"**{m:+.2f} ± {h:.2f}** (EDA-DM better)"
    if m - h > 0:
        return f"{m:+.2f} ± {h:.2f} (EDA-DM worse)"
    return f"{m:+.2f} ± {h:.2f} (no difference)"


def tdac_plot(df: pd.DataFrame, out: Path) -> str | None:
    from eda.tdac import plot_allocation

    rows = df[(df.method == "eda-dm") & (df.seed == df.seed.min())]
    for r in rows.itertuples():
        info = json.loads(r.info)
        tdac, alloc = info_value(info, "tdac"), info.get("allocation")
        if isinstance(alloc, str):
            alloc = json.loads(alloc)
        if tdac and alloc:
            plot_allocation(tdac, alloc, str(out), title=f"TDAC on digits-ddpm: N = {sum(alloc)}, seed {r.seed}, "
                                                          f"r = 3.0, lambda = 1.2")
            return f"{sum(alloc)} samples over {len(alloc)} steps, n_t from {min(alloc)} to {max(alloc)}; " \
                   f"{tdac.get('dense_fraction', float('nan')):.0%} of step pairs within the radius"
    return None


def provenance_lines(ok) -> list[str]:
    """Which commits the rows come from, and whether they predate the method-fidelity fixes (results/fidelity.md):
    a page that mixes commits says so instead of showing one."""
    from bench.studies.fidelity import FIXES

    counts = ok.git_commit.fillna("?").astype(str).value_counts()
    listed = ", ".join(f"{c[:12]}{'-dirty' if c.endswith('-dirty') else ''} ({n} cells)" for c, n in counts.items())
    lines = [f"Rows from {len(counts)} commit(s): {listed}.", ""]
    last_fix = FIXES[-1][0]
    stale = [c for c in counts.index if not _contains(c.removesuffix("-dirty"), last_fix)]
    if stale:
        lines += [f"**These rows predate the method-fidelity fixes** ({len(stale)} of {len(counts)} commits do not "
                  f"contain fix {last_fix}; see results/fidelity.md and docs/fidelity.md). They are kept as the record "
                  "of what was measured then; read no ranking from them until the grid is rerun from one clean "
                  "commit.", ""]
    return lines


def _contains(commit: str, ancestor: str) -> bool:
    import subprocess

    try:
        return subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit], cwd=HERE,
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m bench.studies.digits", description=__doc__.splitlines()[0]).parse_args(argv)
    df = read_runs(runs_dir(HERE), grid="digits")
    if df.empty and (HERE / "digits-study.parquet").is_file():  # re-render from the committed rows
        df = read_file(HERE / "digits-study.parquet")
    elif not df.empty:
        write_file(df, HERE / "digits-study.parquet")
    if df.empty:
        print("no digits rows in results/runs; run `python -m bench.run --grid digits` first", file=sys.stderr)
        return 1
    ok = df[df.status == "ok"].copy()
    settings = [b for b in bits_order(ok.bits) if b != "FP"]
    fp = ok[ok.method == "fp"]
    seeds = sorted(ok.seed.unique())
    lines = ["# Digits study: EDA-DM against its baselines on digits-ddpm", "",
             f"{len(ok)} cells ok, {int((df.status != 'ok').sum())} failed · seeds {', '.join(map(str, seeds))} · "
             f"{int(ok.samples.iloc[0])} samples per cell · "
             "regenerate: `python -m bench.run --grid digits && python -m bench.studies.digits`", "",
             *provenance_lines(ok),
             "Each entry is the mean over seeds ± the 95% Student-t half-width (n = 3 seeds: t = 4.30, so intervals "
             "are wide). FID/KID use Inception features against the 360 held-out digits; *vs FP* compares with the FP "
             "model's samples from the same seed and the same initial noise; digits-FID uses the small digits "
             "classifier (bench/metrics/classifier.py). Quantization time is wall time of one worker on a shared 2-core "
             "CPU.", ""]
    for bits in settings:
        lines += [f"## {bits}", "", "| method | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for m in METHODS:
            d = fp if m == "fp" else ok[(ok.method == m) & (ok.bits == bits)]
            if d.empty:
                continue
            vals = [cell(d[c].tolist(), s, dec) if c in d else "-" for c, _, s, dec in COLUMNS]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
    planned = [(m, b) for m in METHODS[1:] for b in settings]
    short = [f"{m} {b} ({int(((ok.method == m) & (ok.bits == b)).sum())}/{len(seeds)} seeds)" for m, b in planned
             if ((ok.method == m) & (ok.bits == b)).sum() < len(seeds)]
    if short:
        lines += ["**Not yet run** (the grid was stopped there; `python -m bench.run --grid digits` resumes and "
                  "runs only these): " + ", ".join(short) + ".", ""]
    lines += ["## EDA-DM minus each baseline, paired by seed", "",
              "Negative = EDA-DM better (lower). An interval that contains 0 is no evidence either way.", ""]
    for bits in settings:
        lines += [f"**{bits}**", "", "| baseline | " + " | ".join(PAIRED) + " |", "|---" * (len(PAIRED) + 1) + "|"]
        for b in ["rtn", "ptq4dm", "qdiffusion", "eda-dm:tdac-only", "eda-dm:fbr-only"]:
            if ok[(ok.method == b) & (ok.bits == bits)].empty:
                continue
            lines.append(f"| {b} | " + " | ".join(verdict(*paired(ok, "eda-dm", b, bits, m)[:2]) for m in PAIRED)
                         + " |")
        lines.append("")
    lines += ["## Iteration budgets (as run)", "",
              "Every method ran 1% of its own official iteration count (`iters_scale = 0.01`, the same fraction for "
              "all) with 256 calibration samples (`n_samples = 256`; official 1024; Q-Diffusion draws its "
              "cali_n x cali_st set from the same 256 trajectories).", "",
              "| method | reconstruction per unit | quant. s (W4A8, mean) |", "|---|---|---|"]
    for m in METHODS[1:]:
        d = ok[(ok.method == m) & (ok.bits == "W4A8")]
        if d.empty:
            continue
        info = json.loads(d["info"].iloc[0])
        lines.append(f"| {m} | {budget(info)} | {d.quant_seconds.mean():.0f} |")
    plot = HERE / "plots" / "digits-study-tdac.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    desc = tdac_plot(ok, plot)
    if desc:
        lines += ["", "## TDAC allocation", "", f"![TDAC allocation](plots/{plot.name})", "", desc + ".", ""]
    if DISCUSSION.strip():
        lines += ["## What this shows", "", DISCUSSION]
    (HERE / "digits-study.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'digits-study.md'}, {HERE / 'digits-study.parquet'} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
