"""Integer inference (eda.integer): the method's own codes and scales, per-layer and end-to-end parity with the
fake-quant model, save/load, the CLIs, and one-line errors for what integer kernels cannot run."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from bench.errors import BenchError
from eda.checkpoint import WEIGHTS_FILE, _unpack, load_quantized, save_quantized
from eda.integer import (ActQDQ, IntLayer, UnsupportedError, _act_spec, compile_for, integer_unet, layer_codes,
                         load_integer, save_integer, set_mode)
from eda.policy import BitPolicy
from eda.recon import ReconConfig, reconstruct
from eda.trajectories import CalibSet
from eda.wrap import act_quantizers, init_ranges, quant_layers, quantize_unet, set_quant_state

torch.set_num_threads(2)
FAST = {"w_init": "minmax", "a_init": "minmax"}
# the policies whose mapping differs: symmetric 8-bit (int8 weights, zero point folded), 4-bit weights on int8 kernels,
# Q-Diffusion's asymmetric weights (non-zero weight zero points: the all-ones-channel decomposition), 6-bit activations
# (uint8 codes clamped at 63), and both inputs of split layers quantized separately
POLICIES = {"W8A8": {}, "W4A8": {}, "W8A8-asym-w": {"w_symmetric": False, "a_symmetric": False},
            "W6A6-split-conv1": {"split_conv1": True}}


def _inputs(unet, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    cd = getattr(unet.config, "cross_attention_dim", None)
    kw = {} if cd is None else {"encoder_hidden_states": torch.randn(n, 3, cd, generator=g)}
    return torch.randn(n, c, s, s, generator=g), torch.randint(0, 1000, (n,), generator=g), kw


def _quantized(unet, name):
    bits = name.split("-")[0]
    q = quantize_unet(unet, BitPolicy.from_bits(bits, **FAST, **POLICIES[name]))
    x, t, kw = _inputs(unet)
    init_ranges(q, CalibSet(x, t, kw or None), batch_size=4)
    return q


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_activation_codes_bit_identical_to_the_fake_quantizer(tiny_unet):
    """Same formula (x / delta, half to even), so even exact ties give the fake-quantizer's code; a flipped zero-point
    sign or rounding x * (1 / delta) would fail here."""
    q = _quantized(tiny_unet, "W6A6-split-conv1")
    g = torch.Generator().manual_seed(0)
    for name, aq in act_quantizers(q).items():
        if not aq.initialized:  # conv_out's input stays FP
            continue
        spec = _act_spec(aq, name)
        d = float(aq.delta)
        ties = (torch.arange(-80, 80, dtype=torch.float32) + 0.5) * d
        x = torch.cat([torch.randn(4000, generator=g) * 3 * d * 2**aq.n_bits / 8, ties])
        with torch.no_grad():
            assert torch.equal(ActQDQ(**spec).codes(x).to(torch.float32), aq.quantize_int(x)), name
            assert torch.equal(ActQDQ(**spec)(x), aq.fake_quant(x)), name


def test_weight_codes_are_the_methods_own(tiny_unet, tmp_path):
    """After AdaRound reconstruction the codes are the learned rounding, not round-to-nearest of the FP weights; the
    integer model must hold exactly the codes the checkpoint stores."""
    q = _quantized(tiny_unet, "W4A8")
    x, t, _ = _inputs(tiny_unet)
    reconstruct(q, tiny_unet, CalibSet(x, t), ReconConfig(iters=3, batch_size=2, only=("up_blocks.1.resnets.1",)),
                progress=False)
    save_quantized(q, tmp_path / "ck", {})
    stored = load_file(str(tmp_path / "ck" / WEIGHTS_FILE))
    codes = layer_codes(integer_unet(q))
    rtn_differs = False
    for name, layer in quant_layers(q).items():
        for i, (qname, sl) in enumerate(layer.weight_parts()):
            shape = codes[name][i].shape
            want = _unpack(stored[f"w.{name}.{i}.codes"], getattr(layer, qname).n_bits, shape.numel())
            assert torch.equal(codes[name][i].to(torch.int32).flatten(), want), name
            base = layer.weight_quantizer if qname == "weight_quantizer" else layer.weight_quantizer_0
            if hasattr(base, "alpha"):  # AdaRound: round-to-nearest of the FP weight gives other codes
                rtn = torch.clamp(torch.round(layer.module.weight[:, sl] / base.delta) + base.zero_point, 0,
                                  2**base.n_bits - 1)
                rtn_differs |= not torch.equal(rtn.flatten().to(torch.int32), want)
    assert rtn_differs  # the check above can tell the method's codes from re-quantized ones


def _captured_inputs(q, x, t, kw):
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, m in quant_layers(q).items()]
    try:
        with torch.no_grad():
            q(x, t, **kw)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("policy", list(POLICIES))
def test_per_layer_parity(tiny_unet, policy):
    """Given the fake-quant layer's own input, every integer layer (oneDNN kernels and the reference representation)
    gives its output to within float32 accumulation: max error <= 1e-5 of the output's range."""
    q = _quantized(tiny_unet, policy)
    x, t, kw = _inputs(tiny_unet)
    seen = _captured_inputs(q, x, t, kw)
    iu = integer_unet(q)
    layers = {n: m for n, m in iu.named_modules() if isinstance(m, IntLayer)}
    assert set(layers) == set(seen)
    kinds = {"asym": 0, "split": 0, "fp_input": 0}
    for mode in ("onednn", "reference"):
        set_mode(iu, mode)
        for name, layer in layers.items():
            xin, ref = seen[name]
            with torch.no_grad():
                out = layer(xin)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, (mode, name)
            parts = layer.spec["parts"]
            kinds["asym"] += any(p["asym"] for p in parts)
            kinds["split"] += len(parts) > 1
            kinds["fp_input"] += any(p["act"] is None for p in parts)
    assert kinds["fp_input"] == 2  # conv_out, in both modes
    if policy == "W8A8-asym-w":
        assert kinds["asym"] > 0  # the decomposition is exercised
    if "split" in policy or policy == "W8A8":
        assert kinds["split"] > 0


@pytest.mark.parametrize("which,policy", [("tiny_unet", "W4A8"), ("tiny_unet", "W8A8-asym-w"),
                                          ("tiny_cond_unet", "W8A8")])
def test_end_to_end_parity(which, policy, request):
    """The integer model's noise prediction differs from the fake-quant model's by no more than the fake-quant model
    differs from itself computed in float64, within 2x (a quantized network is discontinuous: float32 rounding flips a few codes
    whichever way it is computed), and much less than the quantization error for 4-bit weights."""
    unet = request.getfixturevalue(which)
    q = _quantized(unet, policy)
    x, t, kw = _inputs(unet, n=8, seed=3)
    iu = compile_for(integer_unet(q), "x86")
    q64 = copy.deepcopy(q).double()
    with torch.no_grad():
        fq = q(x, t, **kw).sample
        out = iu(x, t, **kw).sample
        floor = _rel(q64(x.double(), t, **{k: v.double() for k, v in kw.items()}).sample, fq)
        fp = unet(x, t, **kw).sample
    err = _rel(out, fq)
    assert err <= 2 * floor + 1e-5, (err, floor)
    if policy == "W4A8":
        assert err < 0.5 * _rel(fp, fq)


def test_save_load_roundtrip_and_modes(tiny_unet, tmp_path):
    q = _quantized(tiny_unet, "W8A8-asym-w")
    x, t, _ = _inputs(tiny_unet)
    iu = compile_for(integer_unet(q), "x86")
    save_integer(iu, tmp_path / "int", "x86", {"model": "tiny", "method": "rtn", "bits": "W8A8"})
    back, cfg = load_integer(tmp_path / "int")
    assert cfg["backend"] == "x86" and cfg["meta"]["method"] == "rtn"
    with torch.no_grad():
        ref = iu(x, t).sample
        assert torch.equal(compile_for(back, "x86")(x, t).sample, ref)


def test_unsupported_is_one_line_naming_the_layer(tiny_unet):
    q = _quantized(tiny_unet, "W8A8")
    q.down_blocks[0].resnets[0].conv1.act_quantizer.set_bits(16)
    with pytest.raises(UnsupportedError, match=r"layer down_blocks.0.resnets.0.conv1 input: 16-bit activations.*"
                                               r"bench.sample --model") as e:
        integer_unet(q)
    assert "\n" not in str(e.value)
    q = _quantized(tiny_unet, "W8A8")
    q.mid_block.attentions[0].processor.softmax_quantizer.set_bits(16)
    with pytest.raises(UnsupportedError, match="attention mid_block.attentions.0.processor .softmax.: 16-bit"):
        integer_unet(q)
    q = quantize_unet(tiny_unet, BitPolicy.from_bits("W12A8", **FAST))
    x, t, _ = _inputs(tiny_unet)
    init_ranges(q, CalibSet(x, t), batch_size=4)
    with pytest.raises(UnsupportedError, match="layer conv_in .weight_quantizer.: 12-bit weights"):
        integer_unet(q)
    set_quant_state(q, True, False)
    with pytest.raises(UnsupportedError, match="weight-only"):
        integer_unet(q)


def test_cli_export_sample_and_errors(model_dir, tmp_path, capsys, monkeypatch):
    from bench import export, sample
    from tests.conftest import make_tiny_unet

    unet = make_tiny_unet(width=8)
    q = quantize_unet(unet, BitPolicy.from_bits("W8A8", **FAST))
    x, t, _ = _inputs(unet)
    init_ranges(q, CalibSet(x, t), batch_size=4)
    save_quantized(q, tmp_path / "q", {"model": str(model_dir), "method": "rtn", "bits": "W8A8"})
    assert export.main([str(tmp_path / "q"), "--out", str(tmp_path / "int")]) == 0
    assert "on int8 kernels" in capsys.readouterr().out
    assert sample.main(["--model", str(tmp_path / "int"), "--n", "4", "--steps", "2", "--out",
                        str(tmp_path / "g.png"), "--quiet"]) == 0
    assert (tmp_path / "g.png").is_file()
    assert "on integer kernels" in capsys.readouterr().err
    loaded, _ = load_quantized(tmp_path / "q")
    for argv, msg in (([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], "is not a quantized checkpoint"),
                      ([str(tmp_path / "q"), "--out", str(tmp_path / "x"), "--backend", "tpu"], "unknown backend")):
        with pytest.raises(SystemExit):
            export.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    with pytest.raises(SystemExit):  # on this CPU-only machine --device cuda stops at the device check
        sample.main(["--model", str(tmp_path / "int"), "--n", "2", "--out", str(tmp_path / "h.png"), "--device",
                     "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is visible" in err[0]
    with monkeypatch.context() as m:  # where a GPU is visible, the integer export says it runs on x86 CPUs only
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(SystemExit):
            sample.main(["--model", str(tmp_path / "int"), "--n", "2", "--out", str(tmp_path / "h.png"),
                         "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs on x86 CPUs" in err[0] and "fake-quant" in err[0]


def test_unknown_backend_and_missing_export(tmp_path):
    with pytest.raises(BenchError, match="unknown integer backend"):
        compile_for(torch.nn.Identity(), "tensorrt")
    with pytest.raises(BenchError, match="not an integer export"):
        load_integer(tmp_path)


@pytest.mark.slow
def test_x86_inductor_parity(tiny_unet):
    """The PT2E/inductor lowering (minutes of compilation) matches like the eager kernels do."""
    pytest.importorskip("torchao")
    q = _quantized(tiny_unet, "W8A8")
    x, t, _ = _inputs(tiny_unet, n=8, seed=3)
    iu = compile_for(integer_unet(q), "x86-inductor")
    with torch.no_grad():
        fq = q(x, t).sample
        floor = _rel(copy.deepcopy(q).double()(x.double(), t).sample, fq)
        err = _rel(iu(x, t).sample, fq)
    assert err <= 1.5 * floor + 1e-5, (err, floor)


@pytest.mark.slow
def test_exported_w8a8_digits_samples_are_digits(tmp_path):
    """digits-ddpm, round-to-nearest W8A8, exported and sampled on int8 kernels: the classifier sees digits of every
    class, and the samples stay as close to FP's as the fake-quant model's do."""
    from bench import export, sample
    from bench.metrics import classifier
    from bench.models import load_model
    from eda.integer import load_for_backend

    model = load_model("digits-ddpm")
    from eda.trajectories import record_trajectories

    traj = record_trajectories(model, 32, seed=10_000, batch_size=32)
    from eda.registry import get_method

    res = get_method("rtn").quantize(model, "W8A8", traj, seed=0, overrides={"n_samples": 32}, progress=False)
    save_quantized(res.unet, tmp_path / "q", {"model": "digits-ddpm", "method": "rtn", "bits": "W8A8"})
    assert export.main([str(tmp_path / "q"), "--out", str(tmp_path / "int")]) == 0
    assert sample.main(["--model", str(tmp_path / "int"), "--n", "64", "--out", str(tmp_path / "g.png"),
                        "--save-tensor", str(tmp_path / "x.pt"), "--quiet"]) == 0
    images = torch.load(tmp_path / "x.pt", weights_only=True)
    cov, conf = classifier.coverage_confidence(images)
    assert cov == 1.0 and conf > 0.8, (cov, conf)
    unet, _ = load_for_backend(tmp_path / "int")
    fp = model.to_images(model.generate(64, seed=0))
    fq = model.to_images(model.generate(64, seed=0, unet=load_quantized(tmp_path / "q")[0]))
    d_int, d_fq = classifier.digits_fid(images) - classifier.digits_fid(fp), classifier.digits_fid(fq) - \
        classifier.digits_fid(fp)
    assert abs(d_int - d_fq) < 10, (d_int, d_fq)


def _worst_case_layer(kind: str, t: int) -> IntLayer:
    """A layer whose every product is 255 * t: the pair sums a CPU without VNNI forms in int16 overflow for |t| > 64."""
    k = 64
    spec = {"kind": kind, "out": 2, "bias": True,
            "parts": [{"slice": [0, k], "w_shape": [2, k] + ([3, 3] if kind == "conv" else []),
                       "act": {"scale": 0.5, "zero_point": 0, "qmax": 255}, "bits": 8, "asym": False}]}
    if kind == "conv":
        spec.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], kernel=[3, 3])
    layer = IntLayer(spec)
    with torch.no_grad():
        layer.w0.fill_(t)
        layer.s0.copy_(torch.tensor([1.0, 0.25]))
        layer.bias.copy_(torch.tensor([3.0, -1.0]))
    return layer.finalize()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("t", [127, -128])
def test_kernels_are_exact_where_int16_pair_sums_would_saturate(kind, t, monkeypatch):
    """Codes 255 times weights 127 (or -128): on a CPU whose oneDNN kernels saturate int16 pair sums (no VNNI) the
    unsplit kernel is off by half; the layer must give the exact integer result on every CPU, and also when the split
    is forced on a CPU that does not need it (so the split arithmetic is checked everywhere)."""
    from eda import integer

    x = torch.full((1, 64, 3, 3) if kind == "conv" else (3, 64), 127.5)  # codes round(127.5 / 0.5) = 255
    n = 64 * (9 if kind == "conv" else 1)  # conv: the centre pixel sees all 3 x 3 taps
    want = torch.tensor([255 * t * n * 0.5 * 1.0 + 3.0, 255 * t * n * 0.5 * 0.25 - 1.0])
    for forced in (None, True):
        if forced is not None:
            monkeypatch.setattr(integer, "kernels_saturate", lambda: forced)
        layer = _worst_case_layer(kind, t).set_mode("onednn")
        with torch.no_grad():
            y = layer(x)
        got = y[0, :, 1, 1] if kind == "conv" else y[0]
        assert torch.equal(got, want), (forced, got, want)
        assert layer._packed[0][-1] == (2 if integer.kernels_saturate() else 0)  # split rows: 2 outputs per half
    monkeypatch.setattr(integer, "kernels_saturate", lambda: False)  # the unsplit kernel, for contrast
    layer = _worst_case_layer(kind, t).set_mode("onednn")
    with torch.no_grad():
        y = layer(x)
    got = y[0, :, 1, 1] if kind == "conv" else y[0]
    monkeypatch.undo()
    assert torch.equal(got, want) != integer.kernels_saturate()  # the probe tells the two kinds of CPU apart


def test_forced_split_keeps_per_layer_parity(tiny_unet, monkeypatch):
    """The split path (t = hi + lo) through a whole UNet's layers, including the asymmetric-weight decomposition,
    forced on so it runs on CPUs that do not need it."""
    from eda import integer

    monkeypatch.setattr(integer, "kernels_saturate", lambda: True)
    q = _quantized(tiny_unet, "W8A8-asym-w")
    x, t, kw = _inputs(tiny_unet)
    seen = _captured_inputs(q, x, t, kw)
    iu = set_mode(integer_unet(q), "onednn")
    n_split = 0
    for name, layer in ((n, m) for n, m in iu.named_modules() if isinstance(m, IntLayer)):
        xin, ref = seen[name]
        with torch.no_grad():
            out = layer(xin)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, name
        n_split += any(v[-1] for v in layer._packed.values())
    assert n_split > 0
