"""FBR (eda.fbr): which quantized layers enter the layer term, and the loss itself."""

import pytest
import torch

from eda.fbr import capture_outputs, fbr_layers, fbr_loss
from eda.quantizer import lp_loss

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def qunet():
    from eda.policy import BitPolicy
    from eda.wrap import quantize_unet
    from tests.test_methods import tiny_unet

    return quantize_unet(tiny_unet(), BitPolicy.from_bits("W4A8"))


def test_resnet_without_shortcut_conv_uses_conv1_and_temb(qunet):
    block = qunet.down_blocks[0].resnets[0]  # 8 -> 8 channels: no conv_shortcut
    assert getattr(block, "conv_shortcut", None) is None
    assert fbr_layers(block) == ["conv1", "time_emb_proj"]  # conv2 is the last registered: excluded


def test_resnet_with_shortcut_excludes_the_shortcut_not_conv2(qunet):
    block = qunet.up_blocks[0].resnets[0]  # decoder resnet on cat([h, skip]): has a (split) conv_shortcut
    assert block.conv_shortcut is not None
    assert fbr_layers(block) == ["conv1", "time_emb_proj", "conv2"]  # official registration-order quirk, kept


def test_attention_excludes_output_projection(qunet):
    attn = qunet.mid_block.attentions[0]
    assert fbr_layers(attn) == ["to_q", "to_k", "to_v"]


def test_single_layer_unit_has_no_layer_terms(qunet):
    assert fbr_layers(qunet.down_blocks[0].downsamplers[0]) == []


def test_loss_is_block_term_plus_gamma_times_listed_layers():
    torch.manual_seed(0)
    out_q, out_fp = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    lq = {"a": torch.randn(4, 6, 5, 5), "b": torch.randn(4, 7)}
    lf = {"a": torch.randn(4, 6, 5, 5), "b": torch.randn(4, 7), "c": torch.randn(4, 2)}  # extra FP output ignored
    block = lp_loss(out_q, out_fp, p=2.0)
    layers = lp_loss(lq["a"], lf["a"], p=2.0) + lp_loss(lq["b"], lf["b"], p=2.0)
    assert torch.allclose(fbr_loss(out_q, out_fp, lq, lf, gamma=0.8), block + 0.8 * layers)
    assert torch.allclose(fbr_loss(out_q, out_fp, lq, lf, gamma=0.0), block)
    with pytest.raises(KeyError):
        fbr_loss(out_q, out_fp, {"z": lq["a"]}, lf, gamma=0.8)


def test_capture_outputs_records_the_named_layers(qunet):
    from eda.wrap import set_quant_state

    block = qunet.down_blocks[0].resnets[0]
    set_quant_state(qunet, False, False)
    names = fbr_layers(block)
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 32)
    with capture_outputs(block, names) as store:
        block(x, temb)
    assert sorted(store) == sorted(names)
    assert store["conv1"].shape == (2, 8, 8, 8) and store["time_emb_proj"].shape == (2, 8)
    # hooks are removed afterwards
    assert all(not m._forward_hooks for m in block.modules())


def test_recon_engine_uses_the_same_layers_for_every_unit(qunet):
    """eda.recon computes the FBR term itself: its inner layers must be exactly fbr_layers for every unit."""
    from eda.units import reconstruction_units, unit_layers

    units = reconstruction_units(qunet)
    assert {u.kind for u in units} >= {"resnet", "attention", "layer"}
    for u in units:
        engine = list(unit_layers(u))[:-1]
        assert engine == (fbr_layers(u.module) if u.kind != "layer" else []), u.name
