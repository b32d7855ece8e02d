"""`python -m bench.perf`: the performance figures, each a ratio of two timings taken side by side in one
run (never an absolute time compared with a number from another day or machine).

    python -m bench.perf                      # every figure, writes results/perf.md and results/perf/perf.parquet
    python -m bench.perf --only recon,sampling --quick

Figures (keys for --only):
- recon     (a) one reconstruction iteration with FP targets cached once (ours) vs the official scheme, which runs
                three unit forwards per iteration (quantized, FP for the targets, quantized again for the inner-layer
                outputs; EDA-DM `qdiff/block_recon.py`), per unit kind, FBR loss, on digits-ddpm and the DDIM CIFAR-10 UNet (random
                weights);
- sampling  (b) sampling with the fake-quantized UNet vs FP, same model and batch, W8A8 and W4A8 (target <= 1.3x),
                with the implementation before the inference fast path (eda.quantizer.FUSED_INFERENCE,
                eda.wrap.CACHE_QUANT_WEIGHTS off) measured in the same run;
- artifacts (c) a small grid run with shared FP artifacts (samples, trajectories, Inception features) vs the same
                cells recomputing them per cell (target >= 2x), in-process so Ray start-up is not in it;
- ray       (d) the same cells through `python -m bench.run` with 1, 2, ... workers (efficiency = speed-up / workers);
- int8      (f) integer inference (eda.integer) vs FP32 and fake-quant: integer backends on one layer, one UNet call
                at batch 1/8/64 and a sampling run on digits-ddpm and the CIFAR-10 UNet (bench/studies/perf_int8.py);
- cifar     (e) EDA-DM W4A8 quantization time on the DDIM CIFAR-10 UNet at the official budget (N = 1024 calibration
                samples, 5000 iterations x batch 32 per unit), extrapolated from measured pieces (target: <= 20 min on
                one H100; only a GPU run can check it).
- budget    (g) EDA-DM W4A8 on digits-ddpm at the official budget, projected from every unit's iteration at batch 32
                and the FP passes it needs, with the fused training fake-quant (eda.quantizer.FUSED_TRAINING) and
                with the composed ops before it side by side, against the 30-minute target on 2 cores; where the
                slowest unit's iteration spends its time (torch.profiler).
- memory    (h) peak host memory of one harness cell (RTN W8A8, samples saved) at 1k, 5k and 20k samples on an
                LSUN-shaped random model, each in a fresh process: flat when cells stream (bench/studies/perf_memory.py).

Timings alternate the two sides (A B A B ...) and report the median, so a noisy neighbour slows both alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import UsageError, cli_main
from bench.studies.perf_page import FIGURES, run

ROOT = Path(__file__).resolve().parent.parent  # the repository


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated figures: {', '.join(FIGURES)}")
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer repetitions (a smoke check)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "results"), help="writes <out>/perf.md and <out>/perf/perf.parquet")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: rewrite <out>/perf.md from the rows in <out>/perf/perf.parquet")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    figs = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in figs if f not in FIGURES]
    if bad:
        raise UsageError(f"unknown figure(s) {bad}; expected some of {', '.join(FIGURES)}")
    if args.render_only:
        import torch

        from bench.studies.perf_page import rerender

        torch.set_num_threads(args.threads)  # the page header names the thread count the figures ran with
        print(f"wrote {rerender(Path(args.out), argv)}")
        return 0
    run(figs, args, argv, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
