"""Capture a unit's call arguments over a calibration set (the official `save_inp_oup_data` / `GetLayerInpOut`).

`collect_inputs(model, unit_module, calib)` runs the whole UNet on every calibration batch and stops at the unit
(a forward pre-hook raises), keeping the unit's positional and keyword arguments: the main input, and for a resnet
its time embedding, for a transformer block its encoder states. Per-sample tensors are concatenated on the CPU; the
rest (flags, shared tensors) is kept as called. Reconstruction (`eda.recon`) and the performance figures
(`bench.perf`) use this one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from eda.errors import BenchError
from eda.trajectories import CalibSet
from eda.wrap import unet_kwargs

MAIN_INPUT_KWARGS = ("hidden_states", "input_tensor", "sample", "input")


class _Stop(Exception):
    pass


@dataclass
class UnitInputs:
    """A unit's call arguments over the whole calibration set: per-sample tensors concatenated, the rest kept."""

    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    batched: set = field(default_factory=set)  # keys ('a', i) / ('k', name) whose value is per-sample

    def __len__(self) -> int:
        key = next(iter(sorted(self.batched, key=str)), None)
        if key is None:
            return 0
        return len(self.args[key[1]] if key[0] == "a" else self.kwargs[key[1]])

    def get(self, idx: torch.Tensor | slice, device) -> tuple[list, dict]:
        """(args, kwargs) of the samples `idx`, on `device`."""
        def pick(key, v):
            return v[idx].to(device) if key in self.batched else v

        return ([pick(("a", i), v) for i, v in enumerate(self.args)],
                {k: pick(("k", k), v) for k, v in self.kwargs.items()})

    def main_key(self) -> tuple[str, int | str]:
        """Where the unit's main input sits: ('a', 0) for the first positional argument, else ('k', name)."""
        if self.args and ("a", 0) in self.batched:
            return ("a", 0)
        for k in MAIN_INPUT_KWARGS:
            if ("k", k) in self.batched:
                return ("k", k)
        raise BenchError("could not find the main input tensor (first argument or hidden_states) of a unit")


def collect_inputs(model: nn.Module, module: nn.Module, calib: CalibSet, batch_size: int, device,
                   name: str = "unit") -> UnitInputs:
    """Run `model` on the calibration set in its current quant state and capture `module`'s call arguments."""
    chunks: list[tuple[tuple, dict, int]] = []
    cur = [0]

    def pre(mod, args, kwargs):
        chunks.append((args, kwargs, cur[0]))
        raise _Stop

    h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for x, t, cond in calib.batches(batch_size, device=device):
                cur[0] = len(x)
                try:
                    model(x, t, **unet_kwargs(cond))
                except _Stop:
                    pass
    finally:
        h.remove()
    if not chunks:
        raise BenchError(f"unit {name} was never called in a forward pass of the UNet; cannot reconstruct it")
    out = UnitInputs()
    a0, k0, _ = chunks[0]
    for i, v in enumerate(a0):
        if torch.is_tensor(v) and v.dim() > 0 and all(torch.is_tensor(c[0][i]) and len(c[0][i]) == c[2]
                                                      for c in chunks):
            out.batched.add(("a", i))
            v = torch.cat([c[0][i].detach().cpu() for c in chunks])
        out.args.append(v)
    for k, v in k0.items():
        if torch.is_tensor(v) and v.dim() > 0 and all(torch.is_tensor(c[1][k]) and len(c[1][k]) == c[2]
                                                      for c in chunks):
            out.batched.add(("k", k))
            v = torch.cat([c[1][k].detach().cpu() for c in chunks])
        out.kwargs[k] = v
    return out


def first_output(out):
    """A unit's main output: the first element of a tuple, `.sample` of a diffusers output."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out
