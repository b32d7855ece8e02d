"""Quantized checkpoint: packed integer weights round-trip to identical outputs; mismatches give one clear line."""

import json

import pytest
import torch

from bench.errors import BenchError
from eda.checkpoint import _pack, _unpack, load_quantized, packed_size_mb, save_quantized
from eda.policy import BitPolicy
from eda.recon import ReconConfig, reconstruct
from eda.trajectories import CalibSet
from eda.wrap import init_ranges, quant_layers, quantize_unet, set_quant_state

torch.set_num_threads(2)
FAST = {"w_init": "minmax", "a_init": "minmax"}


@pytest.mark.parametrize("bits", [2, 4, 5, 8, 12])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (7, 3))
    assert torch.equal(_unpack(_pack(codes, bits), bits, codes.numel()).reshape(7, 3), codes.to(torch.int32))


def _inputs(c, cond_dim=None, n=4):
    g = torch.Generator().manual_seed(1)
    kw = {} if cond_dim is None else {"encoder_hidden_states": torch.randn(n, 3, cond_dim, generator=g)}
    return torch.randn(n, c, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), kw


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_save_load_identical_outputs(which, request, tmp_path):
    unet = request.getfixturevalue(which)
    c, cd = unet.config.in_channels, getattr(unet.config, "cross_attention_dim", None)
    x, t, kw = _inputs(c, cd)
    q = quantize_unet(unet, BitPolicy.from_bits("W4A8", **FAST, split_conv1=True))
    init_ranges(q, CalibSet(x, t, kw or None), batch_size=4)
    if which == "tiny_unet":  # include AdaRound-hardened weights in the round trip
        reconstruct(q, unet, CalibSet(x, t), ReconConfig(iters=2, batch_size=2, only=("conv_in",
                    "up_blocks.1.resnets.1")), progress=False)
    with torch.no_grad():
        ref = q(x, t, **kw).sample
    save_quantized(q, tmp_path / "ck", {"method": "rtn", "bits": "W4A8", "calib": {"n": 4}})
    back, meta = load_quantized(tmp_path / "ck")
    assert type(back) is type(unet) and meta["method"] == "rtn" and meta["calib"] == {"n": 4}
    assert {n: m.split for n, m in quant_layers(back).items()} == {n: m.split for n, m in quant_layers(q).items()}
    with torch.no_grad():
        out = back(x, t, **kw).sample
    assert (out - ref).abs().max() <= 1e-5
    set_quant_state(back, True, False)
    set_quant_state(q, True, False)
    with torch.no_grad():
        assert (back(x, t, **kw).sample - q(x, t, **kw).sample).abs().max() <= 1e-5


def test_packed_size(tiny_unet):
    sizes = {}
    for bits in ("W8A8", "W4A8"):
        q = quantize_unet(tiny_unet, BitPolicy.from_bits(bits, **FAST, first_last_8bit=False))
        sizes[bits] = packed_size_mb(q)
    fp32 = sizes["W8A8"]["fp32"]
    n_params = sum(p.numel() for p in tiny_unet.parameters())
    assert fp32 == pytest.approx(n_params * 4 / 2**20, rel=1e-6)
    assert sizes["W4A8"]["packed"] < sizes["W8A8"]["packed"] < 0.3 * fp32
    assert sizes["W4A8"]["packed"] < 0.6 * sizes["W8A8"]["packed"]


def test_mismatch_is_one_clear_line(tiny_unet, tmp_path):
    x, t, _ = _inputs(1)
    q = quantize_unet(tiny_unet, BitPolicy.from_bits("W8A8", **FAST))
    init_ranges(q, CalibSet(x, t), batch_size=4)
    save_quantized(q, tmp_path / "ck", {})
    cfg_path = tmp_path / "ck" / "quant_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["diffusers_config"]["block_out_channels"] = [32, 32]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BenchError) as e:
        load_quantized(tmp_path / "ck")
    assert "does not match" in str(e.value) and "\n" not in str(e.value)
    cfg["diffusers_config"]["block_out_channels"] = [32, 64]
    cfg["policy"]["split_shortcut"] = False
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BenchError, match="split"):
        load_quantized(tmp_path / "ck")
    with pytest.raises(BenchError, match="not a quantized checkpoint"):
        load_quantized(tmp_path)
