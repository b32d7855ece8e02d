"""The embedded digits models: digits-ddpm (the default) and digits-cosine (a second, different network for
checking that a ranking holds beyond one architecture); their architectures, committed folders, registrations and
the training recipe that reproduces them (`python -m bench.train digits [--arch cosine]`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.errors import BenchError, UsageError
from bench.metrics.data import DEFAULT_SIZE, load_digits_split
from bench.models.directory import load_unet_dir
from bench.models.model import DiffusionModel
from bench.models.registry import register_model
from bench.models.schedule import alphas_cumprod_for

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # bench/assets
DIGITS_DIR = ASSETS / "digits-ddpm"


@register_model("digits-ddpm")
def _digits_ddpm() -> DiffusionModel:
    """The embedded default: a small DDPM-style UNet trained by `python -m bench.train digits` (committed)."""
    if not (DIGITS_DIR / "unet" / "config.json").is_file():
        raise BenchError(f"the embedded digits-ddpm checkpoint is missing from {DIGITS_DIR}; "
                         "restore it with `git checkout bench/assets` or retrain with `python -m bench.train digits`")
    return load_unet_dir(DIGITS_DIR, name="digits-ddpm")


@register_model("digits-cosine")
def _digits_cosine() -> DiffusionModel:
    """The second embedded digits model (`python -m bench.train digits --arch cosine`, committed): other widths, one
    ResBlock per level, attention at the lowest resolution, the cosine noise schedule."""
    path = ASSETS / "digits-cosine"
    if not (path / "unet" / "config.json").is_file():
        raise BenchError(f"the embedded digits-cosine checkpoint is missing from {path}; restore it with "
                         "`git checkout bench/assets` or retrain with `python -m bench.train digits --arch cosine`")
    return load_unet_dir(path, name="digits-cosine")


# The embedded digits architectures. "ddpm": DDPM's CIFAR-10 building blocks scaled down, 2 ResBlocks per level,
# attention at the middle resolution (as DDPM's attention at 16x16 of 32x32). "cosine": other widths, one ResBlock
# per level, attention at the lowest resolution instead of the middle one, and the cosine noise schedule (Nichol &
# Dhariwal 2021; diffusers' "squaredcos_cap_v2"). Both: attention in the mid block (which TDAC hooks), skip
# concatenations in the decoder.
ARCHS = {
    "ddpm": dict(name="digits-ddpm", schedule="linear", layers_per_block=2, block_out_channels=(32, 64, 64),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32),
    "cosine": dict(name="digits-cosine", schedule="squaredcos_cap_v2", layers_per_block=1,
                   block_out_channels=(48, 48, 96), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=16),
}


def digits_unet(size: int = DEFAULT_SIZE, arch: str = "ddpm"):
    """The UNet of an embedded digits architecture (`ARCHS`)."""
    from diffusers import UNet2DModel

    if arch not in ARCHS:
        raise UsageError(f"unknown digits architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    a = {k: v for k, v in ARCHS[arch].items() if k not in ("name", "schedule")}
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, norm_num_groups=8, dropout=0.1, **a)


@dataclass
class DigitsTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 4e-4
    warmup: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    size: int = DEFAULT_SIZE
    threads: int = 2
    arch: str = "ddpm"  # ARCHS


def train_digits(cfg: DigitsTrainConfig, out_dir: Path | None = None, device: str = "cpu") -> dict:
    """DDPM training (Ho et al. 2020, Alg. 1): eps-prediction MSE, T=1000, the architecture's betas (linear
    1e-4..0.02, or cosine), EMA weights. Default output: bench/assets/<model name>."""
    from tqdm.auto import tqdm

    if cfg.arch not in ARCHS:
        raise UsageError(f"unknown digits architecture {cfg.arch!r}; expected one of {', '.join(ARCHS)}")
    arch = ARCHS[cfg.arch]
    out_dir = Path(out_dir) if out_dir is not None else ASSETS / arch["name"]

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    x_train, _ = load_digits_split("train", cfg.size)
    x_train = x_train.to(device)
    unet = digits_unet(cfg.size, cfg.arch).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    acp = alphas_cumprod_for(arch["schedule"]).float().to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    losses, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc=f"train {arch['name']}", unit="step", mininterval=5)
    for step in bar:
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=g, device=device)
        x0 = x_train[idx]
        t = torch.randint(0, len(acp), (cfg.batch_size,), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    wall = time.time() - t0
    # Loss curve: mean over windows of 100 steps, small enough to commit.
    curve = [sum(losses[i:i + 100]) / len(losses[i:i + 100]) for i in range(0, len(losses), 100)]
    ema.cpu().save_pretrained(out_dir / "unet", safe_serialization=True)
    meta = {
        "name": arch["name"],
        "dataset": "digits",
        "schedule": {"beta_schedule": arch["schedule"], "num_train_timesteps": 1000, "beta_start": 1e-4,
                     "beta_end": 0.02},
        "sampler": {"kind": "ddim", "steps": 100, "eta": 0.0, "skip": "quad"},
        "train": {**asdict(cfg), "device": device, "wall_seconds": round(wall, 1), "torch": torch.__version__,
                  "params": sum(p.numel() for p in unet.parameters()), "final_loss": curve[-1]},
    }
    (out_dir / "bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "loss_curve.json").write_text(json.dumps({"window": 100, "loss": curve}) + "\n")
    return meta
