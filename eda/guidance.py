"""Classifier-free guidance inputs: conditioning dicts that carry `uncond_<key>` next to `<key>`.

A guided model's conditioning holds, per sample, the conditional UNet kwargs (`encoder_hidden_states`,
`class_labels`) and their unconditional counterparts under `uncond_*`. Sampling runs the UNet on [uncond; cond]
(`guided_inputs`, as CompVis' samplers `torch.cat([unconditional_conditioning, c])`), and calibration does the same:
`pair_calibration` turns each calibration sample into an (uncond, cond) pair, as EDA-DM's
`qdiff_control/data_utils.py::save_inp_oup_data` (`x_in = cat([x] * 2)`, `c_in = cat([uncond, cond])`) and
Q-Diffusion's `get_train_samples` (each x_t with `cs` and with `ucs`) calibrate on both branches.
"""

from __future__ import annotations

import torch

from eda.errors import BenchError

UNCOND_PREFIX = "uncond_"


def split_guidance(cond: dict[str, torch.Tensor] | None):
    """Split a conditioning dict into (UNet kwargs, their unconditional counterparts or None)."""
    cond = cond or {}
    kw = {k: v for k, v in cond.items() if not k.startswith(UNCOND_PREFIX)}
    un = {k[len(UNCOND_PREFIX):]: v for k, v in cond.items() if k.startswith(UNCOND_PREFIX)}
    if un and set(un) != set(kw):
        raise BenchError(f"conditioning keys {sorted(cond)} do not pair up: every uncond_<key> needs a <key>")
    return kw, (un or None)


def guided_inputs(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None, guidance: bool = True):
    """UNet inputs for a batch with classifier-free guidance -> (x, t, kwargs): [uncond; cond] when `cond` carries
    `uncond_*` keys (and guidance=True), else the cond kwargs only, cast to x's device and dtype."""
    cond_kw, uncond_kw = split_guidance(cond)
    cast = {k: (v.to(x.device, x.dtype) if v.is_floating_point() else v.to(x.device)) for k, v in cond_kw.items()}
    if uncond_kw is None or not guidance:
        return x, t, cast
    both = {k: torch.cat([uncond_kw[k].to(v.device, v.dtype), v]) for k, v in cast.items()}
    return torch.cat([x, x]), torch.cat([t, t]), both


def pair_calibration(xs: torch.Tensor, ts: torch.Tensor, cond: dict[str, torch.Tensor] | None):
    """(xs, ts, cond) -> the same samples as interleaved (uncond, cond) pairs, 2M in all, when `cond` carries
    `uncond_*` keys; unchanged otherwise. Interleaving keeps both branches of a sample in every even-sized batch,
    as the official [uncond; cond] batches do."""
    cond_kw, uncond_kw = split_guidance(cond)
    if uncond_kw is None:
        return xs, ts, cond
    idx = torch.arange(len(xs)).repeat_interleave(2)
    paired = {k: torch.stack([uncond_kw[k], v], dim=1).flatten(0, 1) for k, v in cond_kw.items()}
    return xs[idx], ts[idx], paired
