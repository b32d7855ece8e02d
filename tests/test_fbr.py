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
    from tests.conftest import make_tiny_unet

    return quantize_unet(make_tiny_unet(width=8), BitPolicy.from_bits("W4A8"))


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


def test_transformer_block_excludes_attn2_output_like_the_official_order(tiny_cond_unet):
    """LDM registers attn1, ff, attn2: the official 'last layer' of a transformer block is attn2.to_out.0, where
    diffusers' registration order would end at ff.net.2."""
    from eda.policy import BitPolicy
    from eda.wrap import quantize_unet

    q = quantize_unet(tiny_cond_unet, BitPolicy.from_bits("W4A8"))
    block = q.down_blocks[0].attentions[0].transformer_blocks[0]
    names = fbr_layers(block)
    assert "attn2.to_out.0" not in names and "ff.net.2" in names
    assert names[0].startswith("attn1.") and names[-1].startswith("attn2.")


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


def test_attention_projection_terms_sum_over_channels(qunet):
    """The official attention computes q/k/v/proj_out as 1x1 convs on [B, C, H, W] and lp_loss sums channels;
    diffusers' Linear projections give [B, HW, C], so their terms sum the last dim. Transformer blocks keep dim 1
    (the official Linear layout is the same there)."""
    from eda.fbr import channel_dim

    attn = qunet.mid_block.attentions[0]
    assert [channel_dim("attention", attn.get_submodule(n)) for n in fbr_layers(attn)] == [-1, -1, -1]
    res = qunet.down_blocks[0].resnets[0]
    assert [channel_dim("resnet", res.get_submodule(n)) for n in fbr_layers(res)] == [1, 1]
    assert channel_dim("transformer", attn.to_q) == 1
    torch.manual_seed(0)
    q, f = torch.randn(2, 16, 8), torch.randn(2, 16, 8)  # [B, tokens, channels]
    z = torch.zeros(2, 3)
    by_channel = fbr_loss(z, z, {"to_q": q}, {"to_q": f}, gamma=1.0, dims={"to_q": -1})
    assert torch.allclose(by_channel, ((q - f) ** 2).sum(-1).mean())
    assert not torch.allclose(by_channel, fbr_loss(z, z, {"to_q": q}, {"to_q": f}, gamma=1.0))  # tokens: differs


def test_recon_runs_the_fbr_layer_terms_of_every_unit(qunet):
    """What eda.recon actually ran: every block unit's FBR layer terms are fbr_layers (the one FBR), their first
    iteration adds a positive layer term to the block term, and plain MSE runs none."""
    import copy

    from eda.recon import ReconConfig, reconstruct
    from eda.trajectories import CalibSet
    from eda.units import reconstruction_units
    from eda.wrap import init_ranges

    q = copy.deepcopy(qunet)
    fp = copy.deepcopy(qunet)
    from eda.wrap import set_quant_state

    set_quant_state(fp, False, False)
    g = torch.Generator().manual_seed(0)
    calib = CalibSet(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g))
    init_ranges(q, calib, batch_size=8)
    units = {u.name: u for u in reconstruction_units(q)}
    rep = reconstruct(q, fp, calib, ReconConfig(iters=2, batch_size=4, loss="fbr", gamma=0.8), progress=False)
    for name, r in rep["units"].items():
        expect = fbr_layers(units[name].module) if units[name].kind != "layer" else []
        assert r["layer_terms"] == expect, name
        if expect:
            assert r["terms_first"]["layers"] > 0 and r["losses"][0] == pytest.approx(
                r["terms_first"]["block"] + 0.8 * r["terms_first"]["layers"], rel=1e-5), name
    q2 = copy.deepcopy(qunet)
    init_ranges(q2, calib, batch_size=8)
    rep2 = reconstruct(q2, fp, calib, ReconConfig(iters=2, batch_size=4, loss="mse"), progress=False)
    assert all(r["layer_terms"] == [] and r["terms_first"]["layers"] == 0 for r in rep2["units"].values())
