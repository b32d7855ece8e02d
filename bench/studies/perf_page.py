"""The performance page: runs the figures of bench.studies.perf_figures and bench.studies.perf_int8 and writes
results/perf.md plus one Parquet row per figure (`python -m bench.perf`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bench.harness import provenance
from bench.studies.perf_figures import fig_artifacts, fig_budget, fig_cifar, fig_ray, fig_recon, fig_sampling
from bench.studies.perf_int8 import fig_int8
from bench.studies.perf_memory import fig_memory

FIGURES = ("recon", "sampling", "artifacts", "ray", "cifar", "int8", "budget", "memory")


def environment(argv: list[str]) -> dict:
    """The page's provenance (bench.harness.provenance.environment) and the command that measured it."""
    return {"command": "python -m bench.perf " + " ".join(argv), **provenance.environment()}


def write(rows: list[dict], env: dict, out_parquet: Path, page: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    for k in ("command", "device", "git_commit", "time", "load_average"):
        df[k] = env[k]
    df["versions"] = json.dumps(env["versions"], sort_keys=True)
    if out_parquet.is_file():  # keep the figures this run did not measure (e.g. `--only ray` later)
        old = pd.read_parquet(out_parquet)
        old = old[~old.figure.isin(set(df.figure))]
        df = pd.concat([old, df], ignore_index=True) if len(old) else df
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_parquet.with_name(f".{out_parquet.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_parquet)
    page.write_text(render(df, env))


TITLES = {"recon": "(a) Reconstruction iteration: cached FP targets vs the official three forwards",
          "sampling": "(b) Sampling: fake-quantized vs FP (target: at most 1.3x)",
          "artifacts": "(c) Shared FP artifacts vs recomputing them per cell (target: at least 2x)",
          "ray": "(d) Ray scaling",
          "cifar": "(e) EDA-DM W4A8 on the CIFAR-10 UNet at the official budget (extrapolated)",
          "int8": "(f) Integer inference: W8A8 on int8 kernels vs FP32 and fake-quant (target: >= 1.5x FP32, CIFAR-10 "
                  "UNet call at batch 8)",
          "budget": "(g) EDA-DM W4A8 on digits at the official budget: reconstruction throughput (target: 30 min on "
                    "2 cores)",
          "memory": "(h) A cell's peak host memory against its sample count (target: flat, at most 1.1x from 1k to "
                    "20k samples)"}


def render(df, env: dict) -> str:
    lines = ["# Performance (`python -m bench.perf`)", "",
             f"Device: {env['device']}, {env['cpus']} cores, {env['threads']} torch thread(s). A figure measured by "
             "an earlier `--only` run keeps its own command, time and load average below.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "Every ratio compares two timings taken side by side in this run (interleaved, median of the "
             "repetitions). Absolute seconds are this machine's and only give scale.", ""]
    for fig in FIGURES:
        part = df[df.figure == fig]
        if part.empty:
            continue
        first = part.iloc[0]
        load = first.get("load_average", float("nan"))
        if fig == "memory":
            lines += render_memory(part, first, load)
            continue
        lines += [f"## {TITLES[fig]}", "", f"Measured {first['time']} by `{first['command']}` (commit "
                  f"`{str(first['git_commit'])[:12]}`, load average {load:.1f}).", "",
                  "| case | baseline | s | ours | s | ratio | target | met |", "|---|---|---|---|---|---|---|---|"]
        for r in part.itertuples():
            sym = "x" if r.ratio_kind == "speedup" else "x of baseline"
            tgt = "" if r.target is None or r.target != r.target else (
                f">= {r.target:g}x" if r.ratio_kind == "speedup" else f"<= {r.target:g}x")
            met = {True: "yes", False: "**no**"}.get(r.target_met, "")
            lines.append(f"| {r.case} | {r.baseline} | {r.baseline_seconds:.3g} | {r.ours} | {r.ours_seconds:.3g} "
                         f"| {r.ratio:.2f} {sym} | {tgt} | {met} |")
        if fig == "ray":
            eff = [json.loads(d)["efficiency"] for d in part.details]
            lines += ["", "Efficiency (speed-up / workers): " + ", ".join(
                f"{json.loads(d)['workers']} workers {e:.2f}" for d, e in zip(part.details, eff))]
        if fig == "int8":
            d = [json.loads(x) for x in part.details]
            call = next((x for x in d if x.get("part") == "unet call"), {})
            lines += ["", f"Threads: {sorted({x.get('threads') for x in d})}. UNet rows: backend "
                      f"{call.get('backend')}, W8A8 with {call.get('ranges')} ranges, {call.get('int8_ops')} of "
                      f"{call.get('ops')} conv/linear on int8 kernels (the rest take an FP input), "
                      f"{call.get('asym_layers')} with the weight zero-point decomposition, {call.get('attention')} "
                      "attention blocks (q/k/v/softmax quantized, bmm in FP32). Layer rows: max error relative to "
                      "the exact integer result in `details`; ONNX Runtime and x86-inductor rows appear only where "
                      "`pip install -e '.[int8]'` installed them."]
        if fig == "budget":
            d = json.loads(part.details.iloc[0])
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in d["slowest_unit_top_ops"])
            lines += ["", f"{d['units']} reconstruction units, {d['threads']} torch thread(s); the parts that do not "
                      f"depend on the training path (trajectories, ranges, input collection) take "
                      f"{d['fixed_s'] / 60:.1f} min. Where an iteration of the slowest unit ({d['slowest_unit']}) "
                      f"spends its CPU time (torch.profiler, self time): {ops}."]
        if fig == "cifar":
            d = json.loads(part.details.iloc[0])
            lines += ["", "Pieces (hours on this machine): " + ", ".join(
                f"{k.removesuffix('_s')} {d[k] / 3600:.2f}" for k in ("trajectories_s", "act_ranges_s",
                                                                       "input_collection_s", "reconstruction_s")),
                      f"GPU: {d['gpu']}."]
        lines.append("")
    return "\n".join(lines)

def render_memory(part, first, load) -> list[str]:
    """Figure (h): peak RSS per sample count (MB, not seconds), the ratio to the smallest count, and the slope."""
    d = json.loads(first.details)
    ms = d["measurements"]
    lines = [f"## {TITLES['memory']}", "", f"Measured {first['time']} by `{first['command']}` (commit "
             f"`{str(first['git_commit'])[:12]}`, load average {load:.1f}). One RTN W8A8 cell per sample count, "
             f"each in a fresh process and cache, FP samples computed in it and samples saved (--save-samples): "
             f"a random {d['image_shape'][1]} x {d['image_shape'][2]} RGB model (LSUN's shape, 2-channel UNet, one "
             f"DDIM step), batch {d['batch_size']}.", "",
             "| samples | peak RSS (MB) | vs the smallest | saved .npz (MB) | whole float32 FP + quantized samples "
             "(MB, what a cell held before streaming) | wall s |", "|---|---|---|---|---|---|"]
    for m in ms:
        lines.append(f"| {m['n']} | {m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] / ms[0]['peak_rss_mb']:.2f}x | "
                     f"{m['saved_mb']:.0f} | {m['whole_tensor_mb']:.0f} | {m['seconds']:.0f} |")
    worst = max(r.ratio for r in part.itertuples())
    met = all(bool(r.target_met) for r in part.itertuples())
    lines += ["", f"Largest ratio {worst:.2f}x (target <= 1.1x: {'met' if met else '**not met**'}). Slope "
              f"{d['slope_mb_per_sample'] * 1024:.2f} KB per sample between {ms[0]['n']} and {ms[-1]['n']} samples; "
              f"extrapolated linearly to 50k samples: {d['extrapolated_50k_mb']:.0f} MB for this model. "
              "What a cell keeps per sample is 4 bytes (its squared error against the FP sample), plus 8 KB of "
              "Inception features when the grid asks for KID or precision/recall (bench.metrics.stream).", ""]
    lines += architecture_extrapolation(ms, d["slope_mb_per_sample"])
    return lines


def architecture_extrapolation(ms: list[dict], slope_mb: float) -> list[str]:
    """The 50k-sample cell of each paper architecture, extrapolated from this figure's measurements and the parameter
    counts in results/architectures/NAME.json (python -m bench.studies.architectures): the measured peak at the
    largest count, the measured slope over the remaining samples, and the weights that a cell adds: the FP UNet,
    its quantized copy (fake-quantized weights are cached, README "Performance"), the autoencoder and text encoder,
    in float32."""
    folder = Path(__file__).resolve().parents[2] / "results" / "architectures"
    base = ms[-1]["peak_rss_mb"] + max(slope_mb, 0.0) * (50_000 - ms[-1]["n"])  # the cell without the weights
    rows = []
    for f in sorted(folder.glob("*.json")):
        a = json.loads(f.read_text())
        unet = int(a["params"].get("unet", 0))
        vae = sum(int(v) for k, v in a["params"].items() if k != "unet")  # autoencoder, text encoder
        weights = 4 * (2 * unet + vae) / 2 ** 20
        rows.append(f"| {a['name']} | {unet / 1e6:.0f}M | {vae / 1e6:.0f}M | {weights:.0f} | {base + weights:.0f} |")
    if not rows:
        return []
    return ["Extrapolated to a 50k-sample cell of each paper architecture: the peak at "
            f"{ms[-1]['n']} samples plus the slope (floored at 0) over the remaining samples, plus float32 weights "
            "(FP UNet, its quantized copy, the autoencoder and text encoder; parameter counts from "
            "results/architectures/). One "
            "batch of the architecture's activations comes on top; it does not grow with the sample count.", "",
            "| architecture | UNet params | other params | weights (MB) | 50k-sample cell, host (MB) |",
            "|---|---|---|---|---|", *rows, ""]


def run(figs: list[str], args, argv: list[str], out: Path) -> None:
    """Measure `figs` in order, rewriting the page and the Parquet file after each (nothing is lost to a crash)."""
    torch.set_num_threads(args.threads)
    env = environment(argv)
    print(f"bench.perf on {env['device']}, {env['threads']} thread(s), commit {env['git_commit'][:12]}", flush=True)
    rows: list[dict] = []
    fns = {"recon": fig_recon, "sampling": fig_sampling, "artifacts": fig_artifacts, "ray": fig_ray,
           "cifar": fig_cifar, "int8": fig_int8, "budget": fig_budget, "memory": fig_memory}
    for f in figs:
        print(f"[{f}] {TITLES[f]}", flush=True)
        rows += fns[f](args)
        write(rows, env, out / "perf" / "perf.parquet", out / "perf.md")  # after each figure: nothing lost
    print(f"wrote {out / 'perf.md'} and {out / 'perf' / 'perf.parquet'}")


def rerender(out: Path, argv: list[str]) -> Path:
    """`bench.perf --render-only`: perf.md again from perf/perf.parquet (after a change to how a figure is shown);
    every figure keeps the command, commit, time and load average it was measured with."""
    import pandas as pd

    from bench.errors import UsageError

    parquet = out / "perf" / "perf.parquet"
    if not parquet.is_file():
        raise UsageError(f"no measurements at {parquet}; run `python -m bench.perf` first")
    page = out / "perf.md"
    page.write_text(render(pd.read_parquet(parquet), environment(argv)))
    return page
