"""Reconstruction units of a wrapped diffusers UNet, in forward order (EDA-DM `qdiff/recon_block_Qmodel.py::recon_model`).

Blocks: each ResnetBlock2D ("resnet"), each BasicTransformerBlock ("transformer"; conditional UNets), each Attention
not inside a transformer block ("attention"; UNet2DModel). Every QuantLayer outside those blocks is its own "layer"
unit (conv_in, time-embedding linears, down/up-sampler convs, Transformer2DModel proj_in/proj_out, conv_out), as
the official `recon_model` walk does. The order is the order in which the modules are first called in one traced
forward pass (registration order is not forward order: e.g. UNetMidBlock2D registers attentions before resnets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eda.wrap import QuantLayer, get_quant_state, set_quant_state


@dataclass
class Unit:
    name: str
    module: nn.Module
    kind: str  # "resnet" | "attention" | "transformer" | "layer"


def _block_kind(m: nn.Module) -> str | None:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(m, ResnetBlock2D):
        return "resnet"
    if isinstance(m, BasicTransformerBlock):
        return "transformer"
    if isinstance(m, Attention):
        return "attention"
    return None


def example_inputs(unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A batch of one (x, t, kwargs) that any UNet2DModel / UNet2DConditionModel accepts; used to trace order."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else next(iter(cfg.sample_size))
    dev = next(unet.parameters()).device
    x = torch.zeros(1, cfg.in_channels, size, size, device=dev)
    t = torch.tensor([500], device=dev)
    kw = {}
    cad = getattr(cfg, "cross_attention_dim", None)
    if cad is not None and type(unet).__name__ == "UNet2DConditionModel":
        cad = cad[0] if isinstance(cad, (list, tuple)) else cad
        kw["encoder_hidden_states"] = torch.zeros(1, 2, cad, device=dev)
    if getattr(cfg, "num_class_embeds", None):
        kw["class_labels"] = torch.zeros(1, dtype=torch.long, device=dev)
    return x, t, kw


def reconstruction_units(qmodel: nn.Module, example: tuple | None = None, granularity: str = "block") -> list[Unit]:
    """Units in forward order. granularity='layer' makes every QuantLayer its own unit (layer-wise only)."""
    if granularity not in ("block", "layer"):
        raise ValueError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    cands: dict[str, tuple[nn.Module, str]] = {}
    if granularity == "block":
        inside: list[str] = []
        for name, m in qmodel.named_modules():
            kind = _block_kind(m)
            if kind is None or any(name.startswith(p + ".") for p in inside):
                continue
            cands[name] = (m, kind)
            inside.append(name)
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer) and not any(name.startswith(p + ".") for p in cands):
            cands[name] = (m, "layer")
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n)) for n, (m, _) in cands.items()]
    state = get_quant_state(qmodel)
    set_quant_state(qmodel, False, False)
    try:
        x, t, kw = example if example is not None else example_inputs(qmodel)
        with torch.no_grad():
            qmodel(x, t, **kw)
    finally:
        set_quant_state(qmodel, *state)
        for h in handles:
            h.remove()
    ordered = list(dict.fromkeys(order)) + [n for n in cands if n not in order]  # never-called ones last
    return [Unit(n, cands[n][0], cands[n][1]) for n in ordered]


def unit_layers(unit: Unit) -> dict[str, QuantLayer]:
    """The unit's QuantLayers by name relative to the unit, in registration order."""
    if isinstance(unit.module, QuantLayer):
        return {"": unit.module}
    return {n: m for n, m in unit.module.named_modules() if isinstance(m, QuantLayer)}
