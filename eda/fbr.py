"""FBR: Fine-grained Block Reconstruction loss (EDA-DM Sec. 4.2; official `qdiff/block_recon.py::block_reconstruction`).

    L = lp(B_q(x~), B_fp(x_fp)) + gamma * sum_{l in quantized layers of the block, except the last} lp(O_l^q, O_l^fp)

with lp = `lp_loss(p=2)`: squared error summed over the channel dim, averaged over the rest. This is the one FBR
implementation: `eda.recon` calls `fbr_layers` and `fbr_loss` for every unit, and `bench.perf` times the same.

"The last" is the last quantized layer in module *registration* order, as the official code's list of hooked
QuantModules (`hooks[:-1]`): a diffusers ResnetBlock2D registers conv1, time_emb_proj, conv2[, conv_shortcut], so
without a shortcut conv the layer terms are conv1 + time_emb_proj (the paper figure's L_m1 + L_m2) and with one the
out conv conv2 is included and the shortcut excluded (the official quirk, kept); an Attention registers to_q, to_k,
to_v, to_out.0, so to_out.0 is excluded (the official AttnBlock: q, k, v, proj_out); a BasicTransformerBlock is
ordered as LDM registers it (attn1, ff, attn2), so attn2.to_out.0 is excluded. A unit with a single quantized layer has
no layer terms.

The channel dim of each layer term follows the official layout (`channel_dim`): the official CIFAR and LSUN attention
blocks compute q, k, v and the output projection with 1x1 convolutions on [B, C, H, W] (LSUN: conv1d on [B, C, T]),
where diffusers' `Attention` uses Linear layers on [B, HW, C]; their terms sum over channels (the last dim here), not
over tokens. Transformer blocks (SD, ImageNet LDM) use Linear layers on [B, T, C] in both codes, and the official
`lp_loss` sums their dim 1 (tokens): kept as is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

FBR_GAMMA = 0.8  # --add_loss for CIFAR and ImageNet (Bedroom/Church 1.0, COCO 0.8)


def _is_quant_layer(m: nn.Module) -> bool:
    from eda.wrap import QuantLayer

    return isinstance(m, QuantLayer)


# The official models register a transformer block's sub-modules in another order than diffusers: LDM's
# `BasicTransformerBlock.__init__` builds attn1, ff, attn2 (then the norms), diffusers norm1, attn1, norm2, attn2,
# norm3, ff. "The last layer" is taken in the official order, so it is attn2's output projection, not ff.net.2.
_OFFICIAL_ORDER = {"BasicTransformerBlock": ("attn1", "ff", "attn2")}


def fbr_layers(block: nn.Module, is_layer: Callable[[nn.Module], bool] | None = None) -> list[str]:
    """Names (relative to `block`) of the quantized layers whose outputs enter the FBR layer term: all but the last
    in the official model's registration order."""
    is_layer = is_layer or _is_quant_layer
    names = [n for n, m in block.named_modules() if n and is_layer(m)]
    # a QuantLayer nested in another (never in our wrapper) would count once: keep outermost only
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    groups = _OFFICIAL_ORDER.get(type(block).__name__)
    if groups:
        rank = {g: i for i, g in enumerate(groups)}
        names = sorted(names, key=lambda n: rank.get(n.split(".")[0], len(groups)))  # stable within a group
    return names[:-1]


@contextmanager
def capture_outputs(block: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks storing the latest output of each named sub-module (cleared by the caller per pass)."""
    store: dict[str, torch.Tensor] = {}
    mods = dict(block.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def channel_dim(unit_kind: str, layer: nn.Module) -> int:
    """The dim `lp_loss` sums over for this layer's output term (see the module docstring): -1 for the Linear
    projections of a convolutional attention block ("attention" units of UNet2DModel), else 1."""
    inner = getattr(layer, "module", layer)  # QuantLayer wraps the original Conv2d / Linear
    return -1 if unit_kind == "attention" and isinstance(inner, nn.Linear) else 1


def fbr_loss(out_q: torch.Tensor, out_fp: torch.Tensor, layers_q: dict[str, torch.Tensor],
             layers_fp: dict[str, torch.Tensor], gamma: float = FBR_GAMMA,
             dims: dict[str, int] | None = None) -> torch.Tensor:
    """Block-output lp loss + gamma * the sum of the layer-output lp losses over the layers in `layers_q`, each summed
    over its channel dim `dims[name]` (default 1)."""
    from eda.quantizer import lp_loss

    loss = lp_loss(out_q, out_fp, p=2.0)
    if gamma and layers_q:
        missing = sorted(set(layers_q) - set(layers_fp))
        if missing:
            raise KeyError(f"FBR: no FP output for layer(s) {missing}")
        dims = dims or {}
        loss = loss + gamma * sum(lp_loss(layers_q[n], layers_fp[n].detach(), p=2.0, dim=dims.get(n, 1))
                                  for n in layers_q)
    return loss
