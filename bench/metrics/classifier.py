"""A small CNN trained on the digits train split: a fast domain metric next to the Inception ones.

Its penultimate features (64-d, before the ReLU) give a "digits-FID" (Fréchet distance to the held-out split's
features, the FID recipe of Heusel et al. 2017 with a domain network in place of Inception); its predictions give
the class coverage (fraction of the 10 digits present) and the mean confidence (mean max softmax) of samples.

    python -m bench.train classifier      # retrain; rewrites bench/assets/digits-classifier.safetensors
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.metrics.data import DEFAULT_SIZE, load_digits_split
from bench.errors import BenchError, UsageError

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # bench/assets
WEIGHTS = ASSETS / "digits-classifier.safetensors"
CARD = ASSETS / "digits-classifier.json"
NUM_CLASSES = 10


class DigitsCNN(nn.Module):
    """conv16-conv32-pool-conv32-pool-fc64-fc10 on 1x16x16 inputs in [-1, 1] (~48k parameters)."""

    def __init__(self, width: int = 16, feat_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, feat_dim)
        self.fc2 = nn.Linear(feat_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations before the ReLU (smoother, full-rank statistics for the Fréchet distance)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return self.fc1(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.features(x)))


@dataclass
class ClassifierTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation augmentation in pixels (samples are rarely perfectly centred)
    seed: int = 0
    threads: int = 1  # one thread: faster than two for this tiny net, and bit-reproducible


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    return torch.roll(F.pad(x, (max_shift,) * 4, value=-1.0), (dy, dx), dims=(2, 3))[
        ..., max_shift:-max_shift, max_shift:-max_shift]


def train(cfg: ClassifierTrainConfig | None = None) -> tuple[DigitsCNN, dict]:
    """Train on the digits train split; deterministic for a seed on one machine type and torch version."""
    cfg = cfg or ClassifierTrainConfig()
    torch.manual_seed(cfg.seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        x, y = load_digits_split("train", DEFAULT_SIZE)
        model = DigitsCNN()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps)
        g = torch.Generator().manual_seed(cfg.seed)
        t0 = time.time()
        model.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(x), generator=g)
            for s in range(0, len(x), cfg.batch_size):
                idx = perm[s:s + cfg.batch_size]
                loss = F.cross_entropy(model(_shift(x[idx], cfg.max_shift, g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        info = {"config": asdict(cfg), "wall_seconds": round(time.time() - t0, 1),
                "params": sum(p.numel() for p in model.parameters()),
                "test_accuracy": round(accuracy(model, "test"), 4), "train_accuracy": round(accuracy(model, "train"), 4),
                "torch": torch.__version__}
    finally:
        torch.set_num_threads(prev_threads)
    return model, info


@torch.no_grad()
def accuracy(model: nn.Module, split: str = "test") -> float:
    x, y = load_digits_split(split, DEFAULT_SIZE)
    return float((model(x).argmax(1) == y).float().mean())


def train_and_save(seed: int = 0, path: Path = WEIGHTS) -> dict:
    """Train from `seed` and write the safetensors weights plus a small json card next to them."""
    from safetensors.torch import save_file

    model, info = train(ClassifierTrainConfig(seed=seed))
    path = Path(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"info": json.dumps(info)})
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    _load.cache_clear()
    print(f"saved {path} ({path.stat().st_size // 1024} KB): test accuracy {info['test_accuracy']:.4f}, "
          f"{info['params']} parameters, trained in {info['wall_seconds']:.0f}s")
    return info


@functools.lru_cache(maxsize=2)
def _load(path: str) -> DigitsCNN:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise BenchError(f"the digits classifier weights are missing ({path}); restore them with "
                         "`git checkout bench/assets` or retrain with `python -m bench.train classifier`")
    model = DigitsCNN()
    try:
        model.load_state_dict(load_file(path))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise BenchError(f"corrupt digits classifier weights {path} ({type(e).__name__}); "
                         "retrain with `python -m bench.train classifier`") from None
    return model.eval().requires_grad_(False)


def load_classifier(path: str | Path = WEIGHTS) -> DigitsCNN:
    """The committed classifier (CPU, eval mode), loaded once per process."""
    return _load(str(path))


def _as_digits(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 1|3, H, W] in [-1, 1] -> [N, 1, 16, 16] (grey = channel mean; bilinear resize as bench.metrics.data)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"expected an image tensor of shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(-1, 1)
    x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
    if x.shape[-2:] != (DEFAULT_SIZE, DEFAULT_SIZE):
        x = F.interpolate(x, size=(DEFAULT_SIZE, DEFAULT_SIZE), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def predict(images: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (predicted labels [N], softmax probabilities [N, 10])."""
    model, x = load_classifier(), _as_digits(images)
    probs = torch.cat([model(x[s:s + batch_size]).softmax(1) for s in range(0, len(x), batch_size)])
    return probs.argmax(1), probs


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Penultimate features [N, 64] (float64) for digits-FID."""
    model, x = load_classifier(), _as_digits(images)
    return torch.cat([model.features(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]).double().numpy()


@functools.lru_cache(maxsize=4)
def reference_stats(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the classifier features of a digits split (cheap: computed per process, not on disk)."""
    x, _ = load_digits_split(split, DEFAULT_SIZE)
    f = features(x)
    return f.mean(0), np.cov(f, rowvar=False)


def digits_fid(images: torch.Tensor, split: str = "test") -> float:
    """Fréchet distance between the classifier features of `images` and of the digits `split`."""
    from bench.metrics.distances import frechet

    f = features(images)
    mu, sigma = reference_stats(split)
    return frechet(f.mean(0), np.atleast_2d(np.cov(f, rowvar=False)), mu, sigma)


def coverage_confidence(images: torch.Tensor) -> tuple[float, float]:
    """(fraction of the 10 classes among the predictions, mean max-softmax confidence)."""
    labels, probs = predict(images)
    return len(set(labels.tolist())) / NUM_CLASSES, float(probs.max(1).values.mean())
