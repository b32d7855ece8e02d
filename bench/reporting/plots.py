"""Plots of result rows (PNG + SVG): metric vs bit width per method, quantization time per method, per-step
noise-prediction error vs FP, TDAC allocation, quality vs integer-kernel speed-up, and the FP / per-method sample
grids from the same seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.harness.grid import FP_BITS, FP_METHOD
from bench.metrics.names import LABELS
from bench.reporting.tables import bits_order


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
    (mean over seeds, 95% CI bars): the quality/speed trade-off (bench/harness/int8_cell.py)."""
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


def _sample_figure(d: pd.DataFrame, methods, settings, store_root, path: Path) -> list[Path]:
    """FP and each method x bit width from the same (first) seed, side by side."""
    import io

    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    from bench.harness.store import read_store_file

    seed = d["seed"].min()
    panels = []
    for meth in methods:
        for b in ([FP_BITS] if meth == FP_METHOD else settings):
            r = d[(d["method"] == meth) & (d["bits"] == b) & (d["seed"] == seed)]
            rel = r["sample_grid"].iloc[0] if len(r) else None
            data = read_store_file(store_root, rel) if isinstance(rel, str) else None  # a path or storage URI
            if data:
                panels.append((f"{meth}\n{b}" if meth != FP_METHOD else "fp", imread(io.BytesIO(data), format="png")))
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
