"""Diffusers model folders: a UNet saved with `save_pretrained` (bare, or under `unet/` of a pipeline folder), with
its noise schedule and sampler settings from the pipeline's `scheduler/scheduler_config.json` when there is one, and
an optional `bench.json` next to it (whose "schedule" and "sampler" win over the scheduler config).

Without a scheduler config the schedule is DDPM's linear 1e-4..0.02 over 1000 steps and the sampler the CIFAR-10
papers' DDIM (SamplerConfig defaults), as before scheduler configs were read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError, UsageError
from bench.models.model import DiffusionModel
from bench.models.sampling import PREDICTION_TYPES, SamplerConfig
from bench.models.schedule import BETA_SCHEDULES, alphas_cumprod_for, scheduler_betas

# diffusers scheduler class -> our sampler kind. Other classes (Euler, DPM-Solver, ...) give their schedule and
# prediction type but are sampled with our DDIM: the sampler loop is ours (bench.models.sampling).
SCHEDULER_KINDS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "plms"}
TIMESTEP_SPACINGS = {"leading": "uniform", "trailing": "trailing", "linspace": "linspace"}


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


def read_scheduler_config(root: Path) -> dict[str, Any] | None:
    """scheduler/scheduler_config.json of a pipeline folder (None when there is none)."""
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise BenchError(f"corrupt {f} ({e.msg}); re-save the pipeline's scheduler with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise BenchError(f"{f} is not a JSON object; re-save the pipeline's scheduler with save_pretrained")
    return cfg


def scheduler_settings(cfg: dict[str, Any], where: Path) -> tuple[torch.Tensor, dict[str, Any], str]:
    """(alphas_cumprod, SamplerConfig keywords, prediction_type) of a diffusers scheduler config, as diffusers'
    schedulers/scheduling_ddim.py:DDIMScheduler (__init__, set_timesteps, step) reads it; defaults are the class's.
    Settings we cannot sample faithfully raise a one-line UsageError naming the file."""
    cls = cfg.get("_class_name", "DDIMScheduler")
    kind = SCHEDULER_KINDS.get(cls, "ddim")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise UsageError(f"{where}: prediction_type {pred!r} is not supported; expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    if cfg.get("trained_betas") is None and cfg.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise UsageError(f"{where}: beta_schedule {cfg['beta_schedule']!r} is not supported; expected one of "
                         f"{', '.join(BETA_SCHEDULES)} or trained_betas")
    if cfg.get("thresholding", False):
        raise UsageError(f"{where}: dynamic thresholding (thresholding: true) is not supported; set it to false")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise UsageError(f"{where}: timestep_spacing {spacing!r} is not supported; expected one of "
                         f"{', '.join(TIMESTEP_SPACINGS)}")
    if kind == "ddpm" and cfg.get("variance_type", "fixed_small") != "fixed_small":
        raise UsageError(f"{where}: DDPM variance_type {cfg['variance_type']!r} is not supported; expected "
                         "'fixed_small' (the posterior variance), or set bench.json's sampler to ddim")
    betas = scheduler_betas(cfg)
    if betas.ndim != 1 or len(betas) < 2:
        raise UsageError(f"{where}: trained_betas must be a list of at least 2 numbers")
    # float32 betas as diffusers builds them; the cumulative product in float64 like every other schedule here
    acp = torch.cumprod(1.0 - betas.double(), dim=0)
    sampler = {
        "kind": kind,
        "skip": TIMESTEP_SPACINGS[spacing],
        # diffusers adds steps_offset to "leading" time steps only (set_timesteps)
        "offset": int(cfg.get("steps_offset", 0)) if spacing == "leading" else 0,
        # DDIM (and DDPM: its last step has no previous alpha_bar) default to 1, PNDM to alpha_bar_0
        "set_alpha_to_one": bool(cfg.get("set_alpha_to_one", cls != "PNDMScheduler")),
        # DDIM / DDPM default clip_sample=True, range 1 (PNDM has no clip_sample)
        "clip_x0": float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", cls != "PNDMScheduler") else 0.0,
    }
    return acp, sampler, pred


def load_unet_dir(directory: str | os.PathLike, name: str | None = None) -> DiffusionModel:
    """A UNet directory (config.json + weights), or a pipeline directory with unet/ (and optional bench.json)."""
    root = Path(directory)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    unet = _read_unet(unet_dir)
    meta = _read_sampling_meta(root)
    sched_cfg = read_scheduler_config(root)
    sampler_kw: dict[str, Any] = {}
    prediction_type = "epsilon"
    if sched_cfg is not None:
        acp, sampler_kw, prediction_type = scheduler_settings(sched_cfg, root / "scheduler" / "scheduler_config.json")
    if "schedule" in meta or sched_cfg is None:
        sched = meta.get("schedule", {})
        acp = alphas_cumprod_for(sched.get("beta_schedule", "linear"), sched.get("num_train_timesteps", 1000),
                                 sched.get("beta_start", 1e-4), sched.get("beta_end", 0.02))
    prediction_type = meta.get("prediction_type", prediction_type)
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"{root / 'bench.json'}: prediction_type {prediction_type!r} is not supported; expected one "
                         f"of {', '.join(PREDICTION_TYPES)}")
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    return DiffusionModel(
        name=name or meta.get("name", root.name),
        unet=unet,
        alphas_cumprod=acp,
        sampler=SamplerConfig(**{**sampler_kw, **meta.get("sampler", {})}),
        sample_shape=(cfg.in_channels, size, size),
        dataset=meta.get("dataset", "unknown"),
        source=str(root),
        prediction_type=prediction_type,
    )
