"""Model registry: a name -> a loaded `DiffusionModel` (UNet + noise schedule + the official sampler settings).

Models are registered by name with `@register_model`; the harness and the CLIs only ever call `load_model(name)`.
`load_model` also accepts a local directory in diffusers `save_pretrained` layout (a bare UNet, or a pipeline
folder with `unet/`) or a saved quantized model (see `eda.checkpoint`).

Only the UNet is quantized. Anything around it (a VAE decoder, a text encoder, classifier-free guidance) lives in
`eps_fn` / `decode`, which stay full precision.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.errors import BenchError, UsageError
from bench.sampling import SamplerConfig
from bench.schedule import alphas_cumprod_for
# the guidance helpers live in the method library; re-exported so `bench.models.split_guidance` keeps working
from eda.guidance import UNCOND_PREFIX, guided_inputs, split_guidance  # noqa: F401

ASSETS = Path(__file__).resolve().parent / "assets"
DIGITS_DIR = ASSETS / "digits-ddpm"


@dataclass
class DiffusionModel:
    """Everything needed to sample from, calibrate and evaluate one diffusion model."""

    name: str
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor
    sampler: SamplerConfig
    sample_shape: tuple[int, ...]  # shape of x_t for one sample (latent shape for LDMs)
    dataset: str  # reference data for metrics, e.g. "digits"
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [-1, 1]
    # Conditioning for calibration and sampling: a function (n, seed) -> dict of extra UNet kwargs per sample.
    conditioning: Callable[[int, int], dict[str, torch.Tensor]] | None = None
    guidance_scale: float = 1.0
    defaults: dict[str, Any] = field(default_factory=dict)  # per-task method defaults (e.g. TDAC lambda, r)
    source: str = ""  # where the weights came from
    # Text-to-image models: the prompt of each sample, (n, seed) -> list[str], in the order `conditioning` encodes
    # them (the CLIP score compares each image with its prompt).
    prompts: Callable[[int, int], list[str]] | None = None

    def unet_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None):
        """The batch the UNet actually sees for (x_t, t, cond) -> (x, t, kwargs): [uncond; cond] when
        guidance_scale != 1 and `cond` carries `uncond_*` keys (see guided_inputs), else the cond branch only."""
        return guided_inputs(x, t, cond, guidance=self.guidance_scale != 1.0)

    def eps_fn(self, unet: torch.nn.Module | None = None, cond: dict[str, torch.Tensor] | None = None):
        """The sampler's view of `unet` (default: this model's FP UNet): (x_t, t) -> predicted noise, with
        classifier-free guidance eps_u + s (eps_c - eps_u) when `cond` carries `uncond_*` keys (see unet_inputs)."""
        net = self.unet if unet is None else unet

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xin, tin, kwargs = self.unet_inputs(x, t, cond)
            out = net(xin, tin, **kwargs)
            out = out.sample if hasattr(out, "sample") else out
            out = out[:, : x.shape[1]]  # learned-sigma UNets output 2C channels; the sampler uses eps only
            if xin.shape[0] != x.shape[0]:
                e_u, e_c = out.chunk(2)
                out = e_u + self.guidance_scale * (e_c - e_u)
            return out

        return eps

    def generate(self, n: int, seed: int = 0, unet: torch.nn.Module | None = None,
                 sampler: SamplerConfig | None = None, batch_size: int = 256, device: str | torch.device = "cpu",
                 hooks=(), progress: bool = False) -> torch.Tensor:
        """Run the sampler for n samples from `seed` with `unet` (default: the FP UNet); returns x_0 on CPU
        (latents for LDMs: pass them through `to_images`). Conditioning, if any, comes from
        `self.conditioning(n, seed)` and is sliced per batch, so FP and quantized runs see the same inputs."""
        from bench.sampling import sample

        cond = self.conditioning(n, seed) if self.conditioning is not None else None

        def per_batch(start: int, stop: int):
            return self.eps_fn(unet, None if cond is None else {k: v[start:stop] for k, v in cond.items()})

        return sample(per_batch, n, self.sample_shape, self.alphas_cumprod, sampler or self.sampler, seed=seed,
                      batch_size=batch_size, device=device, hooks=hooks, progress=progress, per_batch=True)

    def timesteps(self, sampler: SamplerConfig | None = None) -> list[int]:
        """The training time steps the sampler visits (default: this model's sampler), as `generate` runs them."""
        from bench.sampling import timesteps

        return timesteps(sampler or self.sampler, len(self.alphas_cumprod))

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1] (decodes latents for LDMs)."""
        return (self.decode(x0) if self.decode is not None else x0).clamp(-1, 1)


_REGISTRY: dict[str, Callable[..., DiffusionModel]] = {}


def register_model(name: str):
    """Register a loader `fn(**kwargs) -> DiffusionModel` under `name`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def load_model(name_or_dir: str, device: str | torch.device = "cpu", **kwargs) -> DiffusionModel:
    """Load a registered model by name, or a local diffusers directory. Raises a one-line BenchError otherwise."""
    if name_or_dir in _REGISTRY:
        model = _REGISTRY[name_or_dir](**kwargs)
    elif os.path.isdir(name_or_dir):
        model = load_unet_dir(name_or_dir)
    else:
        raise UsageError(
            f"unknown model {name_or_dir!r}; expected one of {', '.join(available_models())} "
            "or a local directory saved with save_pretrained"
        )
    model.unet.to(device).eval()
    return model


def _read_unet(path: Path):
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise BenchError(f"no config.json in {path}; expected a diffusers UNet saved with save_pretrained")
    try:
        cls_name = json.loads(cfg_file.read_text()).get("_class_name", "UNet2DModel")
    except json.JSONDecodeError as e:
        raise BenchError(f"corrupt {cfg_file} ({e.msg}); re-save the model with save_pretrained") from None
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(cls_name)
    if cls is None:
        raise BenchError(f"{path} holds a {cls_name}; expected UNet2DModel or UNet2DConditionModel")
    weights = [p for p in path.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise BenchError(f"no weights (diffusion_pytorch_model.safetensors) in {path}; re-save or re-download it")
    try:
        return cls.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers raises many kinds for a truncated or mismatched file
        raise BenchError(f"could not load the UNet in {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                         "the checkpoint is corrupt or incomplete, re-save or re-download it") from None


def _read_sampling_meta(path: Path) -> dict[str, Any]:
    meta = path / "bench.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_unet_dir(directory: str | os.PathLike, name: str | None = None) -> DiffusionModel:
    """A UNet directory (config.json + weights), or a pipeline directory with unet/ (and optional bench.json)."""
    root = Path(directory)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    unet = _read_unet(unet_dir)
    meta = _read_sampling_meta(root)
    sched = meta.get("schedule", {})
    acp = alphas_cumprod_for(sched.get("beta_schedule", "linear"), sched.get("num_train_timesteps", 1000),
                             sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02))
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    return DiffusionModel(
        name=name or meta.get("name", root.name),
        unet=unet,
        alphas_cumprod=acp,
        sampler=SamplerConfig(**meta.get("sampler", {})),
        sample_shape=(cfg.in_channels, size, size),
        dataset=meta.get("dataset", "unknown"),
        source=str(root),
    )


@register_model("digits-ddpm")
def _digits_ddpm() -> DiffusionModel:
    """The embedded default: a small DDPM-style UNet trained by `python -m bench.train digits` (committed)."""
    if not (DIGITS_DIR / "unet" / "config.json").is_file():
        raise BenchError(f"the embedded digits-ddpm checkpoint is missing from {DIGITS_DIR}; "
                         "restore it with `git checkout bench/assets` or retrain with `python -m bench.train digits`")
    return load_unet_dir(DIGITS_DIR, name="digits-ddpm")


# The paper models (CIFAR-10 DDIM, LSUN LDMs, ImageNet LDM, Stable Diffusion) register themselves on import.
from bench import zoo as _zoo  # noqa: E402,F401
