"""Diffusers model folders: a UNet saved with `save_pretrained` (bare, or under `unet/` of a pipeline folder), with
its noise schedule and sampler settings from an optional `bench.json` next to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.models.model import DiffusionModel
from bench.models.sampling import SamplerConfig
from bench.models.schedule import alphas_cumprod_for


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
