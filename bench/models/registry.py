"""Model registry: a name -> a loaded `DiffusionModel` (UNet + noise schedule + the official sampler settings).

Models are registered by name with `@register_model`; the harness and the CLIs only ever call `load_model(name)`.
`load_model` also accepts a local directory in diffusers `save_pretrained` layout (a bare UNet, or a pipeline
folder with `unet/`, bench.models.directory). The built-in models (the embedded digits-ddpm and the papers' zoo)
register themselves in the modules of `BUILTIN_MODULES`, imported on the first lookup, as eda.registry does for
methods: this module imports none of them.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from bench.errors import UsageError
from bench.models.directory import load_unet_dir
from bench.models.model import DiffusionModel

# Modules that register the built-in models, imported on the first registry lookup (one line per model file).
BUILTIN_MODULES = ("bench.models.digits", "bench.models.zoo")
_LOADED = False

_REGISTRY: dict[str, Callable[..., DiffusionModel]] = {}
_AVAILABILITY: dict[str, Callable[[], tuple[bool, str]]] = {}


def register_model(name: str, available: Callable[[], tuple[bool, str]] | None = None):
    """Register a loader `fn(**kwargs) -> DiffusionModel` under `name`. `available`, for a model whose weights may
    be missing on a machine (a plugin loading a checkpoint from disk), answers (loadable here, where or what is
    missing) without loading anything: the dry run prints it, the harness fails such a model's cells in seconds,
    and on a cluster only nodes where it answers True get its cells (bench.harness.probe)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        if available is not None:
            _AVAILABILITY[name] = available
        return fn

    return deco


def registered_availability(name: str) -> tuple[bool, str]:
    """A registered model's own availability check (register_model's `available`), else (True, "built in")."""
    check = _AVAILABILITY.get(name)
    if check is None:
        return True, "built in"
    ok, why = check()
    return bool(ok), str(why)


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)


def available_models() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def load_model(name_or_dir: str, device: str | torch.device = "cpu", **kwargs) -> DiffusionModel:
    """Load a registered model by name, or a local diffusers directory. Raises a one-line BenchError otherwise."""
    _load_builtins()
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
