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
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--save-tensor", help="also save the images in [-1, 1] as a .pt tensor here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def is_quantized_dir(path: str) -> bool:
    """A directory written by eda.checkpoint.save_quantized (it holds the quantized config file)."""
    if not Path(path).is_dir():
        return False
    from eda.checkpoint import CONFIG_FILE

    return (Path(path) / CONFIG_FILE).is_file()


def load_for_sampling(name_or_dir: str, device: str = "cpu", seed: int | None = None):
    """(DiffusionModel, unet to sample with, description): a quantized dir brings its FP model for the sampler.
    With `seed`, a quantized model calibrated on that very noise seed is refused (its samples would start from its
    own calibration trajectories' x_T, bench/harness/seeds.py)."""
    from bench.models import load_model
    from eda.integer import is_integer_dir

    if is_integer_dir(name_or_dir):  # bench.export: runs on integer kernels (CPU)
        from eda.integer import load_for_backend

        unet, cfg = load_for_backend(name_or_dir, device=device)
        meta = cfg["meta"]
        if not meta.get("model"):
            raise UsageError(f"{name_or_dir} has no 'model' in its metadata; export it again with python -m bench.export")
        model = load_model(meta["model"], device=device)
        return model, unet, (f"{meta.get('method', '?')} {meta.get('bits', '?')} of {model.name} on integer kernels "
                             f"({cfg['backend']})")
    if is_quantized_dir(name_or_dir):
        from eda.checkpoint import load_quantized

        qunet, meta = load_quantized(name_or_dir)
        if seed is not None and meta.get("calib_seed") == seed:
            raise UsageError(f"--seed {seed} is the noise seed {name_or_dir} was calibrated on; its samples would "
                             "start from its own calibration trajectories: sample with another --seed")
        base = meta.get("model")
        if not base:
            raise UsageError(f"{name_or_dir} has no 'model' in its metadata; re-save it with python -m bench.quantize")
        model = load_model(base, device=device)
        qunet.to(device).eval()
        return model, qunet, f"{meta.get('method', '?')} {meta.get('bits', '?')} of {model.name}"
    model = load_model(name_or_dir, device=device)
    return model, None, f"{model.name} (FP)"


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
