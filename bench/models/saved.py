"""Saved models as the CLIs take them: a quantized directory (`python -m bench.quantize --out`, eda.checkpoint), an
integer export (`python -m bench.export --out`, eda.integer), or anything bench.models.load_model takes (a registered
name or a diffusers folder). A saved quantized model comes back with its FP model, whose sampler and data it uses.
"""

from __future__ import annotations

from pathlib import Path

from bench.errors import UsageError


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
