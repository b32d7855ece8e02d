"""How much each metric of a grid moves when only floating-point details change, and across seeds:
`python -m bench.noise [--grid smoke]`. The regression check's tolerances (bench/check.py) come from this.

The grid is run several times with `python -m bench.run`, the check's own code path (Ray workers, shared FP
artifacts, bench.cell.run_cell), each time in a fresh results and cache directory, changing one detail that a person
or another machine may change without changing the method:

    base        the grid as committed (the reference configuration)
    repeat      the same again in a new process: must be bit-identical to base
    threads=N   N torch threads per worker (--cpus-per-worker N)
    batch=B     sampling / evaluation batch size B (--batch-size B)
    isa=avx2    another CPU: ATen, oneDNN and MKL capped at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
                MKL_ENABLE_INSTRUCTIONS); isa=default caps them at SSE
    onednn=off  convolutions without oneDNN (--import bench.harness.nomkldnn)

Variants combine with '+', e.g. threads=2+batch=32. Then the grid runs once more at the base configuration with
other seeds (--extra-seeds), for the seed-to-seed spread. Outputs, rendered from the rows only:

    <out>/noise/rows.parquet     every cell of every run (store schema without the per-step and info columns, plus
                                 `variant`); tests/test_check_power.py reruns the check on it
    <out>/noise/spread.parquet   per metric x model x method x bits: float-noise max |delta| (absolute and relative
                                 to base), seed mean / sd, and the check's window for it
    <out>/noise.md               the page: command, commit, device, versions, per-variant and per-metric tables

`--render-only` re-renders spread.parquet and the page from rows.parquet (e.g. after changing the tolerances).
Each run takes as long as the grid (the smoke grid: minutes); the default variants take about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import BenchError, UsageError, cli_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = "base,repeat,threads=2,batch=32,isa=avx2,onednn=off"
DEFAULT_EXTRA_SEEDS = "2,3"
ISA_ENV = {  # what "another CPU" means to each library torch calls
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
HEAVY_COLUMNS = ("eps_mse_per_step", "allocation", "info", "sample_grid")  # not needed to recompute a check
BASE, REPEAT, SEEDS = "base", "repeat", "seeds"


@dataclass(frozen=True)
class Variant:
    """One run of the grid: a name and the float details it changes (None = the grid's own)."""

    name: str
    threads: int | None = None
    batch: int | None = None
    isa: str | None = None
    onednn: bool = True
    seeds: tuple[int, ...] = field(default=())  # only for the seed run

    @property
    def kind(self) -> str:
        return SEEDS if self.seeds else (BASE if self.name == BASE else "float")

    def run_args(self) -> list[str]:
        a = []
        if self.threads:
            a += ["--cpus-per-worker", str(self.threads)]
        if self.batch:
            a += ["--batch-size", str(self.batch)]
        if not self.onednn:
            a += ["--import", "bench.harness.nomkldnn"]
        if self.seeds:
            a += ["--seeds", ",".join(map(str, self.seeds))]
        return a

    def env(self) -> dict[str, str]:
        env = dict(ISA_ENV[self.isa]) if self.isa else {}
        if self.threads and self.threads > 1:
            # OpenMP threads spin while they wait; on a shared machine that costs the run many times its CPU time.
            # The wait policy changes no result.
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        return env

    def describe(self) -> str:
        parts = []
        if self.threads:
            parts.append(f"{self.threads} torch threads per worker")
        if self.batch:
            parts.append(f"batch size {self.batch}")
        if self.isa:
            parts.append(f"CPU kernels capped at {self.isa.upper()} ({', '.join(f'{k}={v}' for k, v in self.env().items())})")
        if not self.onednn:
            parts.append("oneDNN off (bench.harness.nomkldnn)")
        if self.seeds:
            parts.append(f"seeds {', '.join(map(str, self.seeds))} at the base configuration")
        if self.name == REPEAT:
            parts.append("base again, in a new process")
        return "; ".join(parts) or "the grid as committed"


def parse_variant(spec: str) -> Variant:
    spec = spec.strip()
    if spec in (BASE, REPEAT):
        return Variant(spec)
    kw: dict = {}
    for part in spec.split("+"):
        key, sep, val = part.partition("=")
        try:
            if key == "threads" and sep:
                kw["threads"] = int(val)
            elif key == "batch" and sep:
                kw["batch"] = int(val)
            elif key == "isa" and val in ISA_ENV:
                kw["isa"] = val
            elif key == "onednn" and val in ("off", "on"):
                kw["onednn"] = val == "on"
            else:
                raise ValueError
        except ValueError:
            raise UsageError(f"bad variant {part!r} in {spec!r}; expected base, repeat, threads=N, batch=B, "
                             f"isa={'|'.join(ISA_ENV)} or onednn=off, combined with '+'") from None
    if any(v is not None and v < 1 for v in (kw.get("threads"), kw.get("batch"))):
        raise UsageError(f"bad variant {spec!r}; threads and batch must be >= 1")
    return Variant(spec, **kw)


def parse_variants(text: str) -> list[Variant]:
    vs = [parse_variant(s) for s in text.split(",") if s.strip()]
    if not vs or vs[0].name != BASE:
        raise UsageError(f"--variants must start with base (the configuration the others are compared with), got "
                         f"{text!r}")
    if len({v.name for v in vs}) != len(vs):
        raise UsageError(f"--variants lists a variant twice: {text!r}")
    return vs


# ----------------------------------------------------------------------------------------------------------------
# running


def run_variant(grid: str, v: Variant, work: Path, extra_args: list[str]) -> tuple[pd.DataFrame, dict]:
    """One `python -m bench.run` of the grid in work/<variant>/ with its own artifact cache (FP samples, trajectories
    and reference statistics are computed under the variant's float details too). Returns (rows, run info)."""
    from bench.harness.grid import load_grid
    from bench.harness.store import read_runs, runs_dir

    d = work / v.name.replace("=", "-").replace("+", "_")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    env = {k: val for k, val in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                                  "MKL_ENABLE_INSTRUCTIONS", "OMP_WAIT_POLICY")}
    env.update(v.env(), EDA_BENCH_CACHE=str(d / "cache"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "bench.run", "--grid", grid, "--out", str(d), "--no-resume", "--no-progress",
           *v.run_args(), *extra_args]
    t0 = time.time()
    with open(d / "run.log", "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.time() - t0
    rows = read_runs(runs_dir(d), load_grid(grid).name)
    if rows.empty:
        tail = (d / "run.log").read_text().strip().splitlines()[-3:]
        raise BenchError(f"variant {v.name}: bench.run wrote no rows (exit {rc}; last lines of {d / 'run.log'}: "
                         f"{' | '.join(tail)})")
    _check_applied(v, rows)
    rows = rows.drop(columns=[c for c in HEAVY_COLUMNS if c in rows])
    rows["variant"] = v.name
    return rows, {"variant": v.name, "kind": v.kind, "what": v.describe(), "exit": rc, "seconds": seconds,
                  "command": " ".join(f"{k}={shlex.quote(val)}" for k, val in v.env().items())
                  + (" " if v.env() else "") + "python -m bench.run " + " ".join(shlex.quote(c) for c in cmd[3:])}


def _check_applied(v: Variant, rows: pd.DataFrame) -> None:
    """The rows must say the variant took effect (an env var that never reached the Ray workers would otherwise
    measure nothing and look like perfect stability)."""
    ok = rows[rows["status"] == "ok"]
    problems = []
    if v.threads and not (ok["threads"] == v.threads).all():
        problems.append(f"threads {sorted(set(ok['threads']))} instead of {v.threads}")
    if v.batch and not (ok["batch_size"] == v.batch).all():
        problems.append(f"batch_size {sorted(set(ok['batch_size']))} instead of {v.batch}")
    if v.isa and not ok["cpu_kernels"].str.startswith(v.isa.upper()).all():
        problems.append(f"cpu_kernels {sorted(set(ok['cpu_kernels']))} instead of {v.isa.upper()}")
    if not v.onednn and not ok["cpu_kernels"].str.contains("oneDNN off").all():
        problems.append(f"cpu_kernels {sorted(set(ok['cpu_kernels']))} without 'oneDNN off'")
    if problems:
        raise BenchError(f"variant {v.name} did not take effect in the workers: {'; '.join(problems)}")


# ----------------------------------------------------------------------------------------------------------------
# spreads

CELL = ["model", "method", "bits", "seed"]
GROUP = ["model", "method", "bits"]


def measured_metrics(rows: pd.DataFrame) -> list[str]:
    from bench.metrics.names import METRICS

    return [m for m in METRICS if m in rows and rows[m].notna().any()]


def float_deltas(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (float variant, cell, metric): base value, variant value, delta (variant - base)."""
    ok = rows[rows["status"] == "ok"]
    base = ok[ok["variant"] == BASE].set_index(CELL)
    out = []
    for v, g in ok[ok["variant"].ne(BASE) & ok["variant"].ne(SEEDS)].groupby("variant", sort=False):
        g = g.set_index(CELL)
        both = base.index.intersection(g.index)
        for m in measured_metrics(rows):
            b, x = base.loc[both, m], g.loc[both, m]
            out.append(pd.DataFrame({"variant": v, "metric": m, "base": b.values, "value": x.values}, index=both))
    if not out:
        return pd.DataFrame(columns=["variant", *CELL, "metric", "base", "value", "delta"])
    df = pd.concat(out).reset_index()
    df["delta"] = df["value"] - df["base"]
    return df


def spreads(rows: pd.DataFrame, tolerances: dict | None = None) -> pd.DataFrame:
    """Per metric x (model, method, bits): float-noise max |delta| and max |delta| / |base| over variants and seeds,
    the RMS delta, how many values were bit-identical; seed n / mean / sd over the base and seed runs; the check's
    window at the base mean and the worst float delta as a fraction of its window."""
    from bench.reporting.regression import window

    deltas = float_deltas(rows)
    ok = rows[rows["status"] == "ok"]
    seeds = ok[ok["variant"].isin([BASE, SEEDS])]
    out = []
    for m in measured_metrics(rows):
        for key, sg in seeds.groupby(GROUP, sort=False):
            vals = sg[m].dropna().to_numpy(float)
            fd = deltas[(deltas["metric"] == m) & (deltas[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)]
            base = ok[(ok["variant"] == BASE) & (ok[GROUP] == pd.Series(key, index=GROUP)).all(axis=1)][m]
            r = dict(zip(GROUP, key), metric=m, base_mean=float(base.mean()) if len(base) else math.nan,
                     seed_n=len(vals), seed_mean=float(vals.mean()) if len(vals) else math.nan,
                     seed_sd=float(vals.std(ddof=1)) if len(vals) > 1 else math.nan)
            if len(fd):
                a = fd["delta"].abs()
                rel = a / fd["base"].abs().where(fd["base"] != 0)
                w = np.array([window(m, b, tolerances) for b in fd["base"]])
                frac = np.where(w > 0, a / np.where(w > 0, w, 1), np.where(a > 0, np.inf, 0.0))
                worst = int(np.argmax(a.to_numpy()))
                r.update(float_n=len(fd), float_identical=int((fd["delta"] == 0).sum()),
                         float_max_abs=float(a.max()), float_max_rel=float(rel.max()) if rel.notna().any() else math.nan,
                         float_rms=float(np.sqrt((fd["delta"] ** 2).mean())),
                         float_worst=f"{fd['variant'].iloc[worst]}, seed {fd['seed'].iloc[worst]}",
                         window=float(window(m, r["base_mean"], tolerances)), float_max_of_window=float(frac.max()))
            out.append(r)
    return pd.DataFrame(out)


def variant_checks(rows: pd.DataFrame, tolerances: dict | None = None) -> pd.DataFrame:
    """bench.check.compare of each float variant's rows against base's: does the committed rule pass them?"""
    from bench.reporting.regression import compare

    ok = rows[rows["status"] == "ok"]
    base = rows[rows["variant"] == BASE]
    out = []
    for v, g in rows[rows["variant"].ne(BASE) & rows["variant"].ne(SEEDS)].groupby("variant", sort=False):
        bad, compared = compare(base, g, tolerances=tolerances)
        m = measured_metrics(rows)
        a = ok[ok["variant"] == v].set_index(CELL)[m].sort_index()
        b = ok[ok["variant"] == BASE].set_index(CELL)[m].sort_index()
        same = bool(a.index.equals(b.index) and a.equals(b))  # cells may finish (and be read) in another order
        out.append({"variant": v, "compared": compared, "problems": len(bad), "bit_identical": bool(same),
                    "problem_cells": "; ".join(f"{r.method} {r.bits} {r.metric}" for r in bad.itertuples())})
    return pd.DataFrame(out, columns=["variant", "compared", "problems", "bit_identical", "problem_cells"])


# ----------------------------------------------------------------------------------------------------------------
# page


def environment(argv: list[str]) -> dict:
    import torch

    from bench.harness.provenance import cpu_kernels, package_versions
    from bench.harness.provenance import git_commit

    return {"command": "python -m bench.noise " + " ".join(shlex.quote(a) for a in argv),
            "device": f"CPU ({cpu_name()}), {os.cpu_count()} cores, kernels {cpu_kernels()}"
                      if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "versions": package_versions(), "git_commit": git_commit(),
            "time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "load_average": os.getloadavg()[0]}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _g(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return "0" if x == 0 else f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2g}%"


def render(rows: pd.DataFrame, runs: pd.DataFrame, spread: pd.DataFrame, checks: pd.DataFrame, env: dict,
           tolerances: dict | None = None) -> str:
    from bench.reporting.regression import effective_tolerances
    from bench.metrics.names import LABELS, lower_is_better

    tol = effective_tolerances(tolerances)
    grid = rows["grid"].iloc[0]
    commits = sorted(set(rows["git_commit"].dropna()))
    lines = [f"# Float noise and seed noise of the {grid} grid (`python -m bench.noise`)", "",
             f"Measured {env['time']} by `{env['command']}` at commit `{', '.join(dict.fromkeys(c[:12] + ('-dirty' if c.endswith('-dirty') else '') for c in commits))}` on "
             f"{env['device']} (load average {env['load_average']:.1f} at the start).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())), "",
             "Every run is `python -m bench.run` of the grid in a fresh results and artifact-cache directory; the "
             "variants change one float detail each and are compared cell by cell (same seed) with `base`. "
             "`seeds` reruns the base configuration with other seeds. Everything below is rendered from "
             "`results/noise/rows.parquet`; `python -m bench.noise --render-only` re-renders it.", "",
             "## Runs", "",
             "| run | what changes | cells ok / failed | threads | CPU kernels | seconds | bit-identical to base "
             "| `bench.check` against base |", "|---|---|---|---|---|---|---|---|"]
    chk = checks.set_index("variant") if len(checks) else pd.DataFrame()
    for r in runs.itertuples():
        g = rows[rows["variant"] == r.variant]
        n_ok, n_bad = int((g["status"] == "ok").sum()), int((g["status"] != "ok").sum())
        ident = check = "-"
        if r.variant in chk.index:
            c = chk.loc[r.variant]
            ident = "yes" if c["bit_identical"] else "no"
            check = (f"passes ({c['compared']} comparisons)" if c["problems"] == 0
                     else f"**fails**: {c['problems']} problem(s): {c['problem_cells']}")
        lines.append(f"| {r.variant} | {r.what} | {n_ok} / {n_bad} | {', '.join(map(str, sorted(set(g['threads'].dropna()))))} "
                     f"| {', '.join(sorted(set(g['cpu_kernels'].dropna())))} | {r.seconds:.0f} | {ident} | {check} |")
    lines += ["", "Commands, in order:", "", "```"] + [r.command for r in runs.itertuples()] + ["```", ""]

    q = spread[spread["method"] != "fp"]
    lines += ["## Per metric", "",
              "Quantized cells only (the FP cell's paired metrics are 0 by definition). Float noise: the largest "
              "|variant - base| over every float variant, cell and seed, absolute and relative to the base value. "
              "Seed spread: the standard deviation across seeds of a cell's value (base and `seeds` runs), median "
              "and largest over cells, absolute and relative to the cell's mean. Window: `bench.check`'s tolerance "
              "max(abs, rel x |reference|) for one seed; 'worst / window' is the largest float delta as a fraction "
              "of the window at its cell (below 1: the check passes it).", "",
              "| metric | better | float: max abs | float: max rel | float: worst at | seed sd: median | "
              "seed sd: max | seed sd / mean: median | window abs | window rel | worst / window |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(q["metric"]):
        s = q[q["metric"] == m]
        if "float_max_abs" in s and s["float_max_abs"].notna().any():
            i = s["float_max_abs"].idxmax()
            fmax, frel = s["float_max_abs"].max(), s["float_max_rel"].max()
            where = f"{s.loc[i, 'method']} {s.loc[i, 'bits']} ({s.loc[i, 'float_worst']})"
            fw = s["float_max_of_window"].max()
        else:
            fmax = frel = fw = math.nan
            where = "-"
        rel_sd = s["seed_sd"] / s["seed_mean"].abs()
        a, rl = tol.get(m, (math.nan, math.nan))
        lines.append(f"| {LABELS.get(m, m)} (`{m}`) | {'lower' if lower_is_better(m) else 'higher'} | {_g(fmax)} "
                     f"| {_pct(frel)} | {where} | {_g(s['seed_sd'].median())} | {_g(s['seed_sd'].max())} "
                     f"| {_pct(rel_sd.median())} | {_g(a)} | {_pct(rl) if rl else '0'} | {_g(fw, 2)} |")
    lines += ["", "## Per cell", "",
              "| metric | method | bits | base (mean over grid seeds) | float: max abs | float: max rel | identical "
              "| seeds | seed mean | seed sd | window | worst / window |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in spread.itertuples():
        lines.append(f"| `{r.metric}` | {r.method} | {r.bits} | {_g(r.base_mean, 4)} | {_g(getattr(r, 'float_max_abs', math.nan))} "
                     f"| {_pct(getattr(r, 'float_max_rel', math.nan))} "
                     f"| {_g(getattr(r, 'float_identical', math.nan))} / {_g(getattr(r, 'float_n', math.nan))} "
                     f"| {r.seed_n} | {_g(r.seed_mean, 4)} | {_g(r.seed_sd)} | {_g(getattr(r, 'window', math.nan))} "
                     f"| {_g(getattr(r, 'float_max_of_window', math.nan), 2)} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: pd.DataFrame, runs: pd.DataFrame, env: dict, out: Path, page: Path) -> None:
    from bench.harness.store import write_atomic

    spread = spreads(rows)
    checks = variant_checks(rows)
    d = out / "noise"
    meta = rows.copy()
    meta.attrs = {}
    table_meta = {"runs": runs.to_json(orient="records"), "env": json.dumps(env, sort_keys=True)}

    def write_rows(tmp):
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pa.Table.from_pandas(meta, preserve_index=False)
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), **{k.encode(): v.encode()
                                                                       for k, v in table_meta.items()}})
        pq.write_table(t, tmp)

    write_atomic(d / "rows.parquet", write_rows)
    write_atomic(d / "spread.parquet", lambda tmp: spread.to_parquet(tmp, index=False))
    text = render(rows, runs, spread, checks, env)
    write_atomic(page, lambda tmp: Path(tmp).write_text(text))


def read_rows(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """rows.parquet -> (rows, runs, env) as written by write_outputs."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise BenchError(f"no noise measurement at {path}; run `python -m bench.noise` first")
    t = pq.read_table(path)
    meta = t.schema.metadata or {}
    if b"runs" not in meta or b"env" not in meta:
        raise BenchError(f"{path} was not written by bench.noise (no run metadata); rerun `python -m bench.noise`")
    return t.to_pandas(), pd.read_json(__import__("io").StringIO(meta[b"runs"].decode()), orient="records"), \
        json.loads(meta[b"env"])


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.noise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="smoke", help="grid name or .toml path (default: smoke)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated runs, starting with base (default: {DEFAULT_VARIANTS})")
    p.add_argument("--extra-seeds", default=DEFAULT_EXTRA_SEEDS,
                   help=f"seeds of the seed run, besides the grid's own; '' for none (default: {DEFAULT_EXTRA_SEEDS})")
    p.add_argument("--out", default=str(ROOT / "results"),
                   help="writes <out>/noise/rows.parquet, <out>/noise/spread.parquet and --page (default: results/)")
    p.add_argument("--page", default=None, help="the Markdown page (default: <out>/noise.md)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="rerun every variant (default: keep the runs an interrupted measurement of the same clean "
                        "commit left in <out>/noise/rows.parquet)")
    p.add_argument("--work", default=None,
                   help="where the runs and their caches go (default: a temporary directory, removed at the end)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="ARG",
                   help="extra argument passed to every bench.run, e.g. --set=--samples=32 (repeatable)")
    p.add_argument("--render-only", action="store_true",
                   help="re-render spread.parquet and the page from <out>/noise/rows.parquet; run nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _previous(path: Path, grid: str, commit: str):
    """(rows, runs) of an earlier measurement at `path` of the same grid at the same clean commit, else None."""
    if not path.is_file() or not commit or commit.endswith("-dirty"):
        return None
    try:
        rows, runs, env = read_rows(path)
    except BenchError:
        return None
    same = env.get("git_commit") == commit and set(rows.get("grid", pd.Series(dtype=str))) <= {grid}
    return (rows, runs) if same and len(runs) else None


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    page = Path(args.page) if args.page else out / "noise.md"
    if args.render_only:
        rows, runs, env = read_rows(out / "noise" / "rows.parquet")
        write_outputs(rows, runs, env, out, page)
        print(f"re-rendered {page} and {out / 'noise' / 'spread.parquet'} from {len(rows)} rows")
        return 0
    from bench.harness.grid import load_grid

    load_grid(args.grid)  # a bad grid fails now, not after the first run
    variants = parse_variants(args.variants)
    try:
        extra = [int(s) for s in args.extra_seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"bad --extra-seeds {args.extra_seeds!r}; expected integers, e.g. 2,3") from None
    if extra:
        variants.append(Variant(SEEDS, seeds=tuple(extra)))
    env = environment(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="eda-bench-noise-"))
    from tqdm.auto import tqdm

    all_rows, runs = [], []
    done = _previous(out / "noise" / "rows.parquet", args.grid, env["git_commit"]) if args.resume else None
    if done is not None:  # an interrupted measurement of this commit: keep its finished runs
        prev_rows, prev_runs = done
        keep = [v for v in variants if v.name in set(prev_runs["variant"])]
        if keep:
            all_rows.append(prev_rows[prev_rows["variant"].isin([v.name for v in keep])])
            runs += prev_runs[prev_runs["variant"].isin([v.name for v in keep])].to_dict("records")
            print(f"resuming: {', '.join(v.name for v in keep)} already measured at this commit", file=sys.stderr)
            variants = [v for v in variants if v not in keep]
    bar = tqdm(variants, desc=f"bench.noise {args.grid}", unit="run", disable=not args.progress, file=sys.stderr)
    try:
        for v in bar:
            bar.set_postfix_str(v.name)
            rows, info = run_variant(args.grid, v, work, args.sets)
            all_rows.append(rows)
            runs.append(info)
            bad = int((rows["status"] != "ok").sum())
            bar.write(f"{v.name}: {len(rows) - bad} cells ok, {bad} failed in {info['seconds']:.0f}s "
                      f"({v.describe()})", file=sys.stderr)
            # after each run: an interrupted measurement keeps what it has
            write_outputs(pd.concat(all_rows, ignore_index=True), pd.DataFrame(runs), env, out, page)
    finally:
        bar.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {page}, {out / 'noise' / 'rows.parquet'} and {out / 'noise' / 'spread.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
