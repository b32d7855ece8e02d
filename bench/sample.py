"""Sample from a full-precision or a saved quantized model and write a grid PNG.

    python -m bench.sample --model runs/q/digits-eda-w4a8 --n 64 --out grid.png [--seed 0]
    python -m bench.sample --model digits-ddpm --n 64 --out fp.png

A directory written by `python -m bench.quantize` is loaded with `eda.checkpoint.load_quantized` and sampled with
its FP model's sampler (the model named in its metadata); one written by `python -m bench.export` runs on integer
kernels (eda.integer, CPU); anything else goes through `bench.models.load_model`.
The same seed gives the same initial noise for FP and quantized models, so grids compare sample by sample.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from bench.errors import UsageError, cli_main
from bench.models.saved import is_quantized_dir, load_for_sampling  # noqa: F401 - re-exported: bench.sample's API
from bench.harness.devices import HELP as DEVICE_HELP, resolve_device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a quantized model directory (bench.quantize --out), an integer export (bench.export --out), "
                        "a registered model name, or a diffusers directory")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output PNG path for the grid")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default ceil(sqrt(n)))")
    p.add_argument("--scale", type=int, default=None,
                   help="integer upscaling of each image (nearest; default: to at least 64 px per side)")
    p.add_argument("--steps", type=int, default=None, help="override the model's sampler step count")
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch size (default 256)")
    p.add_argument("--device", default="auto", type=resolve_device, help=f"torch device: {DEVICE_HELP}")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--save-tensor", help="also save the images in [-1, 1] as a .pt tensor here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def save_grid(images, path: str, nrow: int | None = None, scale: int | None = None) -> tuple[int, int]:
    """Images in [-1, 1] [N, C, H, W] -> one PNG grid with 2-px gaps; returns the PNG size (w, h)."""
    from bench.metrics.images import grid_image

    scale = scale or max(1, math.ceil(64 / max(images.shape[-2:])))
    img = grid_image(images, nrow=nrow, scale=scale)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img.size


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.nrow is not None and args.nrow < 1 or args.scale is not None and args.scale < 1:
        raise UsageError("--nrow and --scale must be >= 1")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must be a .png path, got {args.out!r}")
    import dataclasses
    import time

    import torch

    torch.set_num_threads(max(1, args.threads))
    model, unet, what = load_for_sampling(args.model, args.device, seed=args.seed)
    sampler = model.sampler if args.steps is None else dataclasses.replace(model.sampler, steps=args.steps)
    t0 = time.perf_counter()
    print(f"sampling {args.n} from {what} ({sampler.describe()}, seed {args.seed})", file=sys.stderr)
    x0 = model.generate(args.n, seed=args.seed, unet=unet, sampler=sampler, batch_size=args.batch_size,
                        device=args.device, progress=not args.quiet)
    images = model.to_images(x0)
    size = save_grid(images, args.out, args.nrow, args.scale)
    if args.save_tensor:
        torch.save(images, args.save_tensor)
    print(f"wrote {args.out} ({size[0]}x{size[1]} px, {args.n} samples) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    main()
