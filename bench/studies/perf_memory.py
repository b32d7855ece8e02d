"""Figure (h) of `python -m bench.perf`: a harness cell's peak host memory against its sample count.

One RTN W8A8 cell (its FP samples computed in the same process, its samples saved with --save-samples) on an
LSUN-shaped random model: 3 x 256 x 256 output, 2-channel UNet, one DDIM step, so the images dominate and the
network does not. Each sample count runs in a fresh process (peak RSS is per process) with a fresh artifact cache.
Before streaming cells, the FP and the quantized samples were held whole in float32 (and converted again for the
metrics): 786 KB per sample each, 31 GB of the 20k cell; a flat line here is what streaming is for.

    python -m bench.perf --only memory                     # 1k, 5k and 20k samples (about 15 min on 2 cores)
    python -m bench.studies.perf_memory --cell DIR --n 1000 --work W   # one measurement, prints a JSON line
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIDE = 256  # LSUN's resolution (EDA-DM Tab. 2: LSUN-Bedrooms / -Churches 256 x 256)
BATCH = 50
COUNTS = (1000, 5000, 20000)
QUICK_COUNTS = (200, 1000)
IMAGE_BYTES = 3 * SIDE * SIDE * 4  # one float32 sample


def build_model(folder: Path) -> Path:
    """A random diffusers UNet with LSUN's output shape and tiny widths, loadable by bench.models.load_model."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIDE, in_channels=3, out_channels=3, block_out_channels=(2,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=2,
                       add_attention=False)  # attention over 256 x 256 tokens would be 16 GB by itself
    unet.save_pretrained(folder / "unet")
    (folder / "bench.json").write_text(json.dumps({
        "name": "lsun-shaped-random", "dataset": "lsun-church",
        "sampler": {"kind": "ddim", "steps": 1, "eta": 0.0, "skip": "uniform"}}))
    return folder


def measure_one(model_dir: Path, n: int, work: Path) -> dict:
    """Run one cell in this process; peak RSS is this process's (ru_maxrss) after it."""
    from bench.harness.artifacts import ArtifactCache
    from bench.harness.cell import run_cell
    from bench.harness.grid import Cell
    from bench.models import load_model

    torch.set_num_threads(1)
    # ATen's convolution instead of oneDNN's: for these 2-channel layers oneDNN is ~5x slower on CPU (measured
    # 0.91 s vs 0.16 s for one 50 x 2 x 256 x 256 conv), and the kernels do not change what the cell keeps.
    torch.backends.mkldnn.enabled = False
    model = load_model(str(model_dir))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cell = Cell("memory", model.name, "rtn", "W8A8", 0, n, metrics=(), overrides={"n_samples": 16},
                batch_size=BATCH)
    t = time.time()
    row, _ = run_cell(model, cell, ArtifactCache(work / "cache"), [("rtn", {"n_samples": 16})],
                      {"samples_dir": work / "samples"}, "cpu")
    seconds = time.time() - t
    saved = Path(row["samples_file"]).stat().st_size
    return {"n": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": before, "seconds": seconds, "status": row["status"],
            "saved_mb": saved / 2 ** 20, "mse_vs_fp": row["mse_vs_fp"], "whole_tensor_mb": 2 * n * IMAGE_BYTES / 2 ** 20}


def measure(n: int, model_dir: Path) -> dict:
    """measure_one in a fresh Python process with a fresh cache (deleted afterwards: 20k samples are ~8 GB)."""
    work = Path(tempfile.mkdtemp(prefix="eda-memory-"))
    try:
        out = subprocess.run([sys.executable, "-m", "bench.studies.perf_memory", "--cell", str(model_dir), "--n",
                              str(n), "--work", str(work)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory cell n={n} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fig_memory(args) -> list[dict]:
    from bench.studies.perf_figures import row

    counts = QUICK_COUNTS if getattr(args, "quick", False) else COUNTS
    folder = Path(tempfile.mkdtemp(prefix="eda-lsun-shaped-"))
    try:
        build_model(folder)
        got = []
        for n in counts:
            print(f"  memory: {n} samples ...", flush=True)
            got.append(measure(n, folder))
            print(f"  memory: {n} samples: peak RSS {got[-1]['peak_rss_mb']:.0f} MB in {got[-1]['seconds']:.0f}s",
                  flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = got[0]
    slope = (got[-1]["peak_rss_mb"] - base["peak_rss_mb"]) / (got[-1]["n"] - base["n"])  # MB per sample
    rows = []
    for g in got[1:]:
        # "seconds" columns hold MB here: the page renders this figure with its own units (perf_page.render)
        rows.append(row("memory", f"peak RSS, {g['n']} vs {base['n']} samples", f"{base['n']} samples",
                        base["peak_rss_mb"], f"{g['n']} samples", g["peak_rss_mb"], "overhead", target=1.1,
                        counts=[x["n"] for x in got], measurements=got, slope_mb_per_sample=slope,
                        extrapolated_50k_mb=base["peak_rss_mb"] + slope * (50_000 - base["n"]),
                        image_shape=[3, SIDE, SIDE], batch_size=BATCH))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.studies.perf_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", type=Path, required=True, help="model folder (build_model)")
    ap.add_argument("--n", type=int, required=True, help="samples in the cell")
    ap.add_argument("--work", type=Path, required=True, help="cache and samples folder")
    args = ap.parse_args(argv)
    print(json.dumps(measure_one(args.cell, args.n, args.work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
