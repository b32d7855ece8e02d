"""Model wrapping: every Conv/Linear and both attention matmuls quantized, exact FP mode, splitting, policy."""

import pytest
import torch
from torch import nn

from bench.errors import UsageError

from eda.policy import BitPolicy
from eda.trajectories import CalibSet
from eda.wrap import (
    QuantAttnProcessor,
    QuantLayer,
    act_quantizers,
    attn_processors,
    concat_splits,
    init_ranges,
    quant_layers,
    quantize_unet,
    set_quant_state,
)

torch.set_num_threads(2)
FAST = {"w_init": "minmax", "a_init": "minmax"}  # the L_p search is tested in test_quantizer.py


def _inputs(unet, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    x = torch.randn(n, c, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999][:n])
    kw = {}
    if getattr(unet.config, "cross_attention_dim", None):
        kw["encoder_hidden_states"] = torch.randn(n, 3, unet.config.cross_attention_dim, generator=g)
    return x, t, kw


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_everything_wrapped_and_fp_mode_exact(which, request):
    from diffusers.models.attention_processor import Attention

    unet = request.getfixturevalue(which)
    n_lin = sum(type(m) in (nn.Conv2d, nn.Linear) for m in unet.modules())
    n_attn = sum(isinstance(m, Attention) for m in unet.modules())
    q = quantize_unet(unet, BitPolicy.from_bits("W4A8", **FAST))
    assert type(q) is type(unet) and q is not unet
    assert len(quant_layers(q)) == n_lin and n_attn > 0
    assert len(attn_processors(q)) == n_attn
    # no bare Conv2d/Linear left outside a QuantLayer
    for name, m in q.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            assert name.endswith(".module")
    # both matmuls: q, k, v and softmax quantizers all fire in the W+A state
    calls = {}
    for name, proc in attn_processors(q).items():
        for qn in ("q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer"):
            getattr(proc, qn).register_forward_hook(lambda *a, k=f"{name}.{qn}": calls.__setitem__(k, 1))
    x, t, kw = _inputs(unet)
    ref = unet(x, t, **kw).sample
    out = q(x, t, **kw).sample
    assert len(calls) == 4 * n_attn
    assert (out - ref).abs().max() > 1e-3  # W4A8 does change the output
    set_quant_state(q, False, False)
    assert (q(x, t, **kw).sample - ref).abs().max() <= 1e-6
    set_quant_state(q, True, False)
    assert (q(x, t, **kw).sample - ref).abs().max() > 1e-4
    assert all(isinstance(p, QuantAttnProcessor) for p in attn_processors(q).values())


def test_cross_attention_with_mask(tiny_cond_unet):
    q = quantize_unet(tiny_cond_unet, BitPolicy.from_bits("W8A8", **FAST))
    x, t, kw = _inputs(tiny_cond_unet)
    mask = torch.ones(3, 3)
    mask[0, 2] = 0
    ref = tiny_cond_unet(x, t, encoder_attention_mask=mask, **kw).sample
    out = q(x, t, encoder_attention_mask=mask, **kw).sample
    assert torch.isfinite(out).all() and (out - ref).abs().mean() < 0.1 * ref.abs().mean()
    set_quant_state(q, False, False)
    assert (q(x, t, encoder_attention_mask=mask, **kw).sample - ref).abs().max() <= 1e-6


def _runtime_concat_channels(unet):
    """Record at run time, for each decoder resnet, (channels of h, channels of skip) of its cat([h, skip])."""
    seen, handles = {}, []
    for j, block in enumerate(unet.up_blocks):
        def pre(mod, args, kwargs, j=j):
            h = kwargs.get("hidden_states", args[0] if args else None)
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            ch = h.shape[1]
            for k, res in enumerate(mod.resnets):
                sk = skips[-1 - k].shape[1]
                seen[f"up_blocks.{j}.resnets.{k}"] = (ch, sk)
                assert ch + sk == res.conv1.in_channels
                ch = res.out_channels
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    x, t, kw = _inputs(unet)
    with torch.no_grad():
        unet(x, t, **kw)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
@pytest.mark.parametrize("split_conv1", [False, True])
def test_split_exactly_on_concat_convs(which, split_conv1, request):
    unet = request.getfixturevalue(which)
    seen = _runtime_concat_channels(unet)
    assert {k: v[0] for k, v in seen.items()} == concat_splits(unet)
    q = quantize_unet(unet, BitPolicy.from_bits("W4A8", **FAST, split_conv1=split_conv1))
    split = {n: m.split for n, m in quant_layers(q).items() if m.split}
    expect = {f"{r}.conv_shortcut": h for r, (h, _) in seen.items()}
    if split_conv1:
        expect.update({f"{r}.conv1": h for r, (h, _) in seen.items()})
    assert split == expect
    x, t, kw = _inputs(unet)
    assert torch.isfinite(q(x, t, **kw).sample).all()
    assert not quant_layers(quantize_unet(unet, BitPolicy.from_bits("W4A8", **FAST, split_shortcut=False)))[
        "up_blocks.0.resnets.0.conv_shortcut"].split


def official_first_last(unet) -> tuple[str, str]:
    """QDrop's set_first_last_layer_to_8bit (w_list[0], w_list[-1]) in the official models' registration order:
    their UNets register the time-embedding MLP before everything else (DDIM `Model.temb`, LDM / improved-diffusion
    `UNetModel.time_embed`), the rest in the order diffusers registers it."""
    from torch import nn

    names = [n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    temb = [n for n in names if n.startswith("time_embedding.")]
    official_order = temb + [n for n in names if n not in temb]
    return official_order[0], official_order[-1]


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_first_last_8bit_is_the_official_choice(which, request):
    unet = request.getfixturevalue(which)
    layers = quant_layers(quantize_unet(unet, BitPolicy.from_bits("W4A8", **FAST)))
    eight = [n for n, m in layers.items() if m.weight_quantizer.n_bits == 8]
    assert tuple(eight) == tuple(sorted(official_first_last(unet), key=list(layers).index))
    assert eight[0] == "time_embedding.linear_1" and eight[-1] == "conv_out"
    io = quant_layers(quantize_unet(unet, BitPolicy.from_bits("W4A8", **FAST, first_last_8bit="conv_io")))
    assert [n for n, m in io.items() if m.weight_quantizer.n_bits == 8] == ["conv_in", "conv_out"]
    with pytest.raises(UsageError, match="first_last_8bit"):
        BitPolicy.from_bits("W4A8", first_last_8bit="first")


def test_policy_first_last_and_output(tiny_unet):
    q = quantize_unet(tiny_unet, BitPolicy.from_bits("W4A8", **FAST))
    layers = quant_layers(q)
    names = list(layers)
    assert names[0] == "conv_in" and names[-1] == "conv_out"
    assert layers["time_embedding.linear_1"].weight_quantizer.n_bits == 8 and \
        layers["conv_out"].weight_quantizer.n_bits == 8
    assert layers["conv_in"].weight_quantizer.n_bits == 4
    assert not layers["conv_out"].act_allowed and layers["conv_in"].act_allowed
    assert next(iter(attn_processors(q).values())).softmax_quantizer.unsigned
    pol = BitPolicy.from_bits("W4A8", **FAST, first_last_8bit=False, quantize_output_input=True, softmax_bits=16,
                              quantize_attention=False)
    q2 = quantize_unet(tiny_unet, pol)
    l2 = quant_layers(q2)
    assert l2["conv_in"].weight_quantizer.n_bits == 4 and l2["conv_out"].act_allowed
    assert not attn_processors(q2)


def test_inplace_and_init_ranges(tiny_unet):
    x, t, _ = _inputs(tiny_unet, n=3)
    ref = tiny_unet(x, t).sample
    q = quantize_unet(tiny_unet, BitPolicy.from_bits("W8A8", **FAST))
    assert not any(isinstance(m, QuantLayer) for m in tiny_unet.modules())
    calib = CalibSet(torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)))
    init_ranges(q, calib, batch_size=4)
    # every activation quantizer saw data, except the (disabled) input quantizer of the output conv
    assert all(qq.initialized for n, qq in act_quantizers(q).items() if not n.startswith("conv_out."))
    out = q(x, t).sample
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3
    q_in = quantize_unet(tiny_unet, BitPolicy.from_bits("W8A8", **FAST), inplace=True)
    assert q_in is tiny_unet and isinstance(tiny_unet.conv_in, QuantLayer)


def test_weight_cache_follows_every_change(tiny_unet):
    # Inference caches each layer's fake-quantized weight; any change to the weight or its quantizer must show.
    from eda.adaround import AdaRoundQuantizer

    q = quantize_unet(tiny_unet, BitPolicy.from_bits("W4A8", **FAST))
    layer = q.conv_in
    layer.init_weight_ranges("minmax")
    with torch.no_grad():
        w1 = layer.quantized_weight()
        assert layer.quantized_weight() is w1  # cached
        changes = [lambda: layer.weight_quantizer.delta.mul_(2),  # in place, as an optimiser step
                   lambda: layer.module.weight.mul_(-1),
                   lambda: layer.weight_quantizer.init_from(layer.module.weight),  # new storage for delta
                   lambda: layer.weight_quantizer.set_bits(3)]
        prev = w1
        for change in changes:
            change()
            now = layer.quantized_weight()
            assert now is not prev, change
            assert torch.equal(now, layer._quantize_weight()) and not torch.equal(now, prev)
            prev = now
    layer.weight_quantizer = AdaRoundQuantizer(layer.weight_quantizer, layer.module.weight)
    with torch.no_grad():
        soft = layer.quantized_weight()
        layer.weight_quantizer.harden()
        hard = layer.quantized_weight()
        assert not torch.equal(soft, hard) and torch.equal(hard, layer._quantize_weight())
    # with autograd on (reconstruction) nothing is cached and gradients flow to the rounding variables
    w = layer.quantized_weight()
    assert w.requires_grad is False or w.grad_fn is not None
    layer.weight_quantizer.soft_targets = True
    layer.weight_quantizer.alpha.requires_grad_(True)
    layer.quantized_weight().sum().backward()
    assert layer.weight_quantizer.alpha.grad is not None and layer._wq_cache is None
