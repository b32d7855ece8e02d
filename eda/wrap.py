"""Fake-quantize a diffusers UNet in place of its own modules (no vendored model code).

- Every nn.Conv2d / nn.Linear becomes a `QuantLayer` (per-channel weight quantizer + per-tensor input-activation
  quantizer; the original module is kept and called unchanged in FP mode).
- Every diffusers `Attention` gets a `QuantAttnProcessor` through its own `set_processor` extension point: Q and K
  are quantized before QK^T, the softmax output (unsigned, `softmax_bits`) and V before probs x V
  (Q-Diffusion `qdiff/quant_block.py::QuantAttnBlock`, EDA-DM likewise). UNet2DModel has no `set_attn_processor`, so we walk the modules.
- Shortcut splitting (Q-Diffusion `--split`, `qdiff/quant_layer.py::QuantModule.forward`): decoder resnets see cat([h, skip]); their 1x1
  `conv_shortcut` (and `conv1` with `split_conv1`) get one weight and one activation quantizer per channel group.
  The split point is h's channel count, derived from the up-block structure (`concat_splits`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from eda.policy import BitPolicy
from eda.quantizer import UniformQuantizer

if TYPE_CHECKING:
    from eda.trajectories import CalibSet


# Inference (no autograd) reuses a layer's fake-quantized weight until the weight or its quantizer changes. Costs one
# extra copy of the UNet's weights in memory; set False to trade that memory back for time.
CACHE_QUANT_WEIGHTS = True


class QuantLayer(nn.Module):
    """A Conv2d/Linear with weight and input-activation fake-quantizers; `split` > 0 quantizes the input-channel
    groups [:split] and [split:] separately (weight_quantizer/act_quantizer and weight_quantizer_0/act_quantizer_0)."""

    def __init__(self, module: nn.Conv2d | nn.Linear, w_bits: int, a_bits: int, policy: BitPolicy, split: int = 0):
        super().__init__()
        self.module = module
        self.split = int(split)
        self.use_weight_quant = True
        self.use_act_quant = True
        self.act_allowed = True  # False for the network-output conv when quantize_output_input is off
        self._wq_cache: tuple | None = None  # (key, fake-quantized weight) for inference, see quantized_weight

        def wq():
            return UniformQuantizer(w_bits, policy.w_symmetric, channel_wise=True, init=policy.w_init)

        def aq():
            return UniformQuantizer(a_bits, policy.a_symmetric, channel_wise=False, init=policy.a_init)

        self.weight_quantizer, self.act_quantizer = wq(), aq()
        if self.split:
            self.weight_quantizer_0, self.act_quantizer_0 = wq(), aq()

    # diffusers and user code sometimes read these off a Conv/Linear
    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def weight_parts(self) -> list[tuple[str, slice]]:
        """(quantizer attribute, input-channel slice) pairs covering the weight."""
        if not self.split:
            return [("weight_quantizer", slice(None))]
        return [("weight_quantizer", slice(0, self.split)), ("weight_quantizer_0", slice(self.split, None))]

    def act_quantizers(self) -> list[UniformQuantizer]:
        return [self.act_quantizer] + ([self.act_quantizer_0] if self.split else [])

    def weight_quantizers(self) -> list[nn.Module]:
        return [getattr(self, n) for n, _ in self.weight_parts()]

    @torch.no_grad()
    def init_weight_ranges(self, method: str | None = None):
        w = self.module.weight
        for name, sl in self.weight_parts():
            q = getattr(self, name)
            if isinstance(q, UniformQuantizer):
                q.init_from(w[:, sl], method)

    def _weight_key(self) -> tuple:
        """Everything the fake-quantized weight depends on: the identity, storage and in-place version of the weight
        and of every quantizer tensor (an optimiser step bumps `_version`, `init_from` swaps storage), plus the
        quantizers' scalar settings (bits, enabled, AdaRound soft/hard)."""
        key = []
        for q in [self.module] + self.weight_quantizers():
            for t in list(q.parameters(recurse=False)) + list(q.buffers(recurse=False)):
                key.append((id(t), t.data_ptr(), t._version))
            if q is not self.module:
                key.append(tuple(v for v in vars(q).values() if isinstance(v, (bool, int, float, str))))
        return tuple(key)

    def quantized_weight(self) -> torch.Tensor:
        if CACHE_QUANT_WEIGHTS and not torch.is_grad_enabled():
            # Sampling calls every layer once per step with the same weights: quantize them once, not 100 times.
            key = self._weight_key()
            if self._wq_cache is None or self._wq_cache[0] != key:
                self._wq_cache = (key, self._quantize_weight())
            return self._wq_cache[1]
        self._wq_cache = None
        return self._quantize_weight()

    def _quantize_weight(self) -> torch.Tensor:
        w = self.module.weight
        if not self.split:
            return self.weight_quantizer(w)
        return torch.cat([getattr(self, n)(w[:, sl]) for n, sl in self.weight_parts()], dim=1)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.act_quantizer(x)
        dim = 1 if isinstance(self.module, nn.Conv2d) else -1
        a, b = x.split([self.split, x.shape[dim] - self.split], dim=dim)
        return torch.cat([self.act_quantizer(a), self.act_quantizer_0(b)], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_acts = self.use_act_quant and self.act_allowed
        if not (self.use_weight_quant or quant_acts):
            return self.module(x)  # FP mode: exactly the original module
        w = self.quantized_weight() if self.use_weight_quant else self.module.weight
        if quant_acts:
            x = self._quant_input(x)
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(x, w, self.module.bias)
        return F.linear(x, w, self.module.bias)

    def extra_repr(self) -> str:
        return f"split={self.split}, act_allowed={self.act_allowed}" if self.split else f"act_allowed={self.act_allowed}"


class QuantAttnProcessor(nn.Module):
    """diffusers `AttnProcessor` semantics with both matmuls quantized; delegates to the original processor when
    activation quantization is off (so FP and weight-only modes are bit-exact with the unwrapped model)."""

    def __init__(self, fp_processor, policy: BitPolicy):
        super().__init__()
        object.__setattr__(self, "fp_processor", fp_processor)  # not a submodule: it holds no parameters
        def mk():
            return UniformQuantizer(policy.a_bits, policy.a_symmetric, init=policy.a_init)

        self.q_quantizer, self.k_quantizer, self.v_quantizer = mk(), mk(), mk()
        # The softmax output quantizer takes the activation settings at `softmax_bits` (sm_abit), one-sided: [0, thres]
        # under the L_p search (EDA-DM), and under Q-Diffusion's 'max' init the activation grid as Q-Diffusion builds
        # it (signed with --a_sym on the CIFAR attention block, else always_zero).
        self.softmax_quantizer = UniformQuantizer(policy.softmax_bits, symmetric=policy.a_symmetric, unsigned=True,
                                                  init=policy.a_init)
        self.use_act_quant = True

    def act_quantizers(self) -> list[UniformQuantizer]:
        return [self.q_quantizer, self.k_quantizer, self.v_quantizer, self.softmax_quantizer]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not self.use_act_quant:
            return self.fp_processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=attention_mask, temb=temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(self.q_quantizer(query))
        key = attn.head_to_batch_dim(self.k_quantizer(key))
        value = attn.head_to_batch_dim(self.v_quantizer(value))
        probs = self.softmax_quantizer(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def concat_splits(unet: nn.Module) -> dict[str, int]:
    """{resnet name: channels of h} for every decoder resnet whose input is cat([h, skip]).

    Up block j receives the mid block's output (j = 0) or up block j-1's output; inside a block, resnet k sees
    the previous resnet's output. A resnet whose conv1 takes more channels than that sees a concatenation.
    """
    up_blocks = getattr(unet, "up_blocks", None)
    if not up_blocks:
        return {}
    mid = getattr(unet, "mid_block", None)
    prev = mid.resnets[-1].out_channels if mid is not None else unet.down_blocks[-1].resnets[-1].out_channels
    out = {}
    for j, block in enumerate(up_blocks):
        for k, res in enumerate(getattr(block, "resnets", [])):
            h = prev if k == 0 else block.resnets[k - 1].out_channels
            if res.conv1.in_channels > h:
                out[f"up_blocks.{j}.resnets.{k}"] = h
        if getattr(block, "resnets", None):
            prev = block.resnets[-1].out_channels
    return out


def first_last_layers(names: list[str], choice: str) -> tuple[str, ...]:
    """The weight layers `set_first_last_layer_to_8bit` puts at 8 bit (`eda.policy.BitPolicy.first_last_8bit`).

    The official models (the DDIM CIFAR-10 `Model`, LDM's and improved-diffusion's `UNetModel`) register their
    time-embedding MLP before the input conv, so QDrop's "first weight quantizer" (`w_list[0]`) is the time
    embedding's first Linear; diffusers registers conv_in first. "official" picks that Linear (the first
    `time_embedding.*` layer; conv_in if the UNet has none) and the last layer (conv_out in both orders)."""
    if choice == "none":
        return ()
    if choice == "conv_io":
        return (names[0], names[-1])
    temb = [n for n in names if n.startswith("time_embedding.")]
    return (temb[0] if temb else names[0], names[-1])


def _attention_cls():
    from diffusers.models.attention_processor import Attention

    return Attention


def quantize_unet(unet: nn.Module, policy: BitPolicy, inplace: bool = False) -> nn.Module:
    """Return the same diffusers class with Conv2d/Linear swapped for QuantLayer and QuantAttnProcessor set on every
    Attention. Quant state after wrapping: weights and activations on (ranges still to be set by `init_ranges`)."""
    if not inplace:
        unet = copy.deepcopy(unet)
    splits = {}
    if policy.split_shortcut:
        for name, h in concat_splits(unet).items():
            splits[f"{name}.conv_shortcut"] = h
            if policy.split_conv1:
                splits[f"{name}.conv1"] = h
    targets = [(n, m) for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    if not targets:
        raise ValueError("no Conv2d/Linear layers to quantize")
    eight_bit = first_last_layers([n for n, _ in targets], policy.first_last_8bit)
    last = targets[-1][0]
    for name, mod in targets:
        w_bits = policy.w_bits
        if name in eight_bit:
            w_bits = max(8, w_bits)
        split = splits.get(name, 0)
        if split and split >= (mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features):
            split = 0
        ql = QuantLayer(mod, w_bits, policy.a_bits, policy, split=split)
        if name == last:
            ql.act_allowed = policy.quantize_output_input  # official: disable_network_output_quantization
        parent_name, _, attr = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, attr, ql)
    if policy.quantize_attention:
        attn_cls = _attention_cls()
        for m in unet.modules():
            if isinstance(m, attn_cls):
                m.set_processor(QuantAttnProcessor(m.processor, policy))
    unet.quant_policy = policy
    set_quant_state(unet, True, True)
    return unet


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def attn_processors(model: nn.Module) -> dict[str, QuantAttnProcessor]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAttnProcessor)}


def act_quantizers(model: nn.Module) -> dict[str, UniformQuantizer]:
    """Every activation quantizer (layer inputs and attention q/k/v/softmax) by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLayer, QuantAttnProcessor)):
            for q in m.act_quantizers():
                out[f"{name}.{next(k for k, v in m.named_children() if v is q)}"] = q
    return out


def set_quant_state(model: nn.Module, weights: bool, acts: bool) -> nn.Module:
    """Switch FP (False, False) / weights only (True, False) / weights+acts (True, True) without rebuilding."""
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.use_weight_quant, m.use_act_quant = bool(weights), bool(acts)
        elif isinstance(m, QuantAttnProcessor):
            m.use_act_quant = bool(acts)
    return model


def get_quant_state(model: nn.Module) -> tuple[bool, bool]:
    layers = list(quant_layers(model).values())
    return (layers[0].use_weight_quant, layers[0].use_act_quant) if layers else (False, False)


def unet_kwargs(cond: dict | None) -> dict:
    """The UNet kwargs of a calibration batch. Guided models calibrate on (uncond, cond) pairs made by
    `CalibSet.paired_for_guidance` (eda/guidance.py), so a batch here holds no `uncond_*` keys; any that remain
    (a CalibSet used unpaired) are not UNet arguments and are dropped."""
    from eda.guidance import split_guidance

    return split_guidance(cond)[0] if cond else {}


@torch.no_grad()
def init_ranges(qmodel: nn.Module, calib: CalibSet, batch_size: int = 32, weights: bool = True, acts: bool = True,
                progress: bool = False) -> nn.Module:
    """Weight ranges (per the policy's w_init), then activation ranges over the calibration batches with weights
    quantized (EDA-DM order: set_weight_quantize_params, then set_act_quantize_params; EMA 0.9/0.1 across
    batches). Leaves the model in the weights+acts state."""
    policy: BitPolicy = qmodel.quant_policy
    if weights:
        for layer in quant_layers(qmodel).values():
            layer.init_weight_ranges(policy.w_init)
    if acts:
        qs = list(act_quantizers(qmodel).values())
        for q in qs:
            q._range = q._range.new_zeros(2, 0)
            q.side = None  # decided again on the first calibration batch
            q.calibrating = True
        set_quant_state(qmodel, True, True)
        batches = calib.batches(batch_size, device=next(qmodel.parameters()).device)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(list(batches), desc="activation ranges", unit="batch")
        try:
            for x, t, cond in batches:
                qmodel(x, t, **unet_kwargs(cond))
        finally:
            for q in qs:
                q.calibrating = False
    set_quant_state(qmodel, True, True)
    return qmodel
