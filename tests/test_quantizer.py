"""Quantizer, AdaRound and bit-policy tests (no model needed)."""

import pytest
import torch

from bench.errors import UsageError
from eda.adaround import AdaRoundQuantizer, annealed_b
from eda.policy import BitPolicy, parse_bits
from eda.quantizer import UniformQuantizer, lp_loss, round_ste

torch.set_num_threads(2)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_error_bound(bits, symmetric):
    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(bits)) * 3 + (0 if symmetric else 1)
    q = UniformQuantizer(bits, symmetric=symmetric, channel_wise=True, init="minmax")
    q.init_from(x)
    err = (q(x) - x).abs()
    # Inside the min-max range the error of round-to-nearest is at most half a step (plus float slack).
    assert (err <= q.delta / 2 * (1 + 1e-4) + 1e-6).all()
    assert q.delta.shape == (8, 1)
    codes = q.quantize_int(x)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_error_shrinks_with_bits():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errs = []
    for bits in (2, 4, 8, 16):
        q = UniformQuantizer(bits, init="minmax")
        q.init_from(x)
        errs.append(((q(x) - x) ** 2).mean().item())
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-8


@pytest.mark.parametrize("symmetric", [True, False])
def test_lp_search_beats_minmax_on_heavy_tails(symmetric):
    torch.manual_seed(1)
    # Laplace / Student-t(3): min-max spends most of the 4-bit grid on rare tail values.
    for x in (torch.distributions.Laplace(0.0, 1.0).sample((20000,)), torch.distributions.StudentT(3.0).sample((20000,))):
        errs = {}
        for init in ("minmax", "lp"):
            q = UniformQuantizer(4, symmetric=symmetric, init=init)
            q.init_from(x)
            errs[init] = ((q(x) - x) ** 2).mean().item()
        assert errs["lp"] < 0.5 * errs["minmax"]


def test_unsigned_softmax_quantizer_uses_zero_floor():
    p = torch.softmax(torch.randn(4, 16, 16), -1)
    q = UniformQuantizer(8, unsigned=True)
    q.init_from(p)
    assert q.zero_point.item() == 0 and (q(p) >= 0).all()


def test_ema_over_batches():
    q = UniformQuantizer(8, init="minmax")
    q.calibrating = True
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-2.0, 2.0]))
    # running hi = 0.9 * 1 + 0.1 * 2
    assert q.delta.item() == pytest.approx(2 * 1.1 / 255, rel=1e-5)


def test_ste_and_lsq_gradients():
    x = torch.linspace(-1, 1, 101, requires_grad=True)
    assert torch.equal(round_ste(x * 3).detach(), (x * 3).round().detach())
    q = UniformQuantizer(4, init="minmax")
    q.init_from(x.detach())
    q.learn_delta()
    q(x).pow(2).sum().backward()
    assert x.grad is not None and q.delta.grad is not None and q.delta.grad.abs() > 0


def test_qdrop_keeps_fp_with_prob():
    x = torch.randn(100000)
    q = UniformQuantizer(2, init="minmax")
    q.init_from(x)
    q.qdrop_prob, q.training_qdrop = 0.5, True
    kept = (q(x) == x).float().mean().item()
    assert 0.45 < kept < 0.56


def test_disabled_is_identity():
    q = UniformQuantizer(2)
    q.enabled = False
    x = torch.randn(10)
    assert torch.equal(q(x), x)


def test_adaround_init_and_harden():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    base = UniformQuantizer(4, channel_wise=True, init="minmax")
    base.init_from(w)
    ada = AdaRoundQuantizer(base, w)
    # soft value = fractional part -> soft weight equals the FP weight clipped to the grid
    lo, hi = -ada.zero_point * ada.delta, (15 - ada.zero_point) * ada.delta
    assert torch.allclose(ada(w), torch.maximum(torch.minimum(w, hi), lo), atol=1e-5)
    ada.harden()
    codes = ada.quantize_int(w)
    floor = torch.floor(w / ada.delta) + ada.zero_point
    assert ((codes == floor) | (codes == floor + 1) | (codes == 2**4 - 1) | (codes == 0)).all()
    assert torch.allclose(ada(w), (codes - ada.zero_point) * ada.delta)
    assert ada.reg_loss(2.0).item() >= 0


def official_b(count, iters, warmup, b_range=(20, 2)):
    """LossFunction.__call__ + LinearTempDecay of Q-Diffusion / EDA-DM `block_recon.py`, transcribed: the b used at
    the count-th call, or None where the rounding loss is 0."""
    loss_start = iters * warmup
    start_decay = (warmup + (1 - warmup) * 0) * iters  # decay_start = 0
    if count < loss_start:
        return None
    if count < start_decay:
        return b_range[0]
    rel_t = (count - start_decay) / (iters - start_decay)
    return b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1 - rel_t)


@pytest.mark.parametrize("iters,warmup", [(100, 0.2), (20000, 0.2), (7, 0.2), (10, 0.0)])
def test_annealed_b_matches_the_official_schedule(iters, warmup):
    for count in range(1, iters + 1):
        assert annealed_b(count, iters, warmup) == official_b(count, iters, warmup), count
    assert annealed_b(iters, iters, warmup) == pytest.approx(2.0)


def test_lp_loss_convention():
    a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert lp_loss(a, b).item() == pytest.approx(3.0)  # summed over channels, averaged over the rest
    assert lp_loss(a, b, reduction="all").item() == pytest.approx(1.0)


def test_parse_bits_and_policy():
    assert parse_bits("W4A8") == (4, 8)
    assert parse_bits("w8a8") == (8, 8)
    for bad in ("W1A8", "W4A17", "4/8", "W4", ""):
        with pytest.raises(UsageError):
            parse_bits(bad)
    pol = BitPolicy.from_bits("W4A8", softmax_bits=16)
    assert (pol.w_bits, pol.a_bits, pol.softmax_bits) == (4, 8, 16)
    with pytest.raises(UsageError):
        BitPolicy(4, 8, w_init="mse")
    with pytest.raises(UsageError):
        UniformQuantizer(1)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("channel_wise", [True, False])
def test_inference_path_bit_identical_to_autograd_formula(bits, symmetric, channel_wise, monkeypatch):
    # Sampling uses the in-place no-grad path; it must reproduce the reconstruction forward exactly.
    import eda.quantizer as Q

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 8, 3, 3, generator=g) * 3
    q = UniformQuantizer(bits, symmetric, channel_wise=channel_wise, init="minmax")
    q.init_from(x)
    y_train = q(x)  # grad mode: the autograd formula
    with torch.no_grad():
        y_inf = q(x)
        monkeypatch.setattr(Q, "FUSED_INFERENCE", False)
        y_ref = q(x)
    assert torch.equal(y_inf, y_ref) and torch.equal(y_inf, y_train.detach())
    assert torch.equal(x, torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits)) * 3)  # not in place


@pytest.mark.slow  # one torch.compile (~35 s on 2 CPU cores)
def test_compiled_inference_kernel_matches_eager(monkeypatch):
    import eda.quantizer as Q

    g = torch.Generator().manual_seed(0)
    for channel_wise, shape in ((False, (4, 8, 6, 6)), (False, (2, 9, 16)), (True, (8, 4, 3, 3))):
        x = torch.randn(*shape, generator=g) * 2
        q = UniformQuantizer(4, symmetric=False, channel_wise=channel_wise, init="minmax")
        q.init_from(x)
        with torch.no_grad():
            monkeypatch.setattr(Q, "COMPILED_INFERENCE", False)
            eager = q(x)
            monkeypatch.setattr(Q, "COMPILED_INFERENCE", True)
            compiled = q(x)
        assert torch.equal(eager, compiled)


# ---- range estimators pinned against transcriptions of the official code ---------------------------------------------
def official_1d_search(x: torch.Tensor, n_bits: int, channel_wise: bool):
    """EDA-DM `qdiff/quant_layer.py::UniformAffineQuantizer.perform_1D_search` + `calculate_qparams` (symmetric
    'mse'), one candidate at a time: one-sidedness of the whole tensor, thres = xrange / 100 * i, L_2.4 error."""
    n_levels = 2**n_bits
    side = "pos" if x.min() >= 0.0 else "neg" if x.max() <= 0.0 else "no"
    y = x.flatten(1) if channel_wise else x.reshape(1, -1)
    x_min, x_max = y.min(1).values, y.max(1).values
    xrange = torch.max(x_min.abs(), x_max)
    best_score = torch.full_like(x_min, 1e10)
    best_min, best_max = x_min.clone(), x_max.clone()

    def qparams(lo, hi):
        scale = torch.max((torch.max(hi, torch.zeros_like(hi)) - torch.min(lo, torch.zeros_like(lo))) / (n_levels - 1),
                          torch.tensor(1e-8))
        zp = torch.clamp(0 - torch.round(torch.min(lo, torch.zeros_like(lo)) / scale), 0, n_levels - 1)
        return scale, zp

    for i in range(1, 101):
        thres = xrange / 100 * i
        new_min = torch.zeros_like(x_min) if side == "pos" else -thres
        new_max = torch.zeros_like(x_max) if side == "neg" else thres
        scale, zp = qparams(new_min, new_max)
        xq = (torch.clamp(torch.round(y / scale[:, None]) + zp[:, None], 0, n_levels - 1) - zp[:, None]) * scale[:, None]
        score = (y - xq).abs().pow(2.4).mean(1)
        best_min = torch.where(score < best_score, new_min, best_min)
        best_max = torch.where(score < best_score, new_max, best_max)
        best_score = torch.min(score, best_score)
    return qparams(best_min, best_max)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("kind", ["weight", "activation", "positive", "negative", "mixed-channels"])
def test_lp_search_matches_the_official_1d_search(bits, kind):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 8, 3, 3, generator=g) * torch.rand(16, 1, 1, 1, generator=g) * 2
    if kind == "positive":
        x = x.abs()  # one-sided: [0, thres]
    elif kind == "negative":
        x = -x.abs()
    elif kind == "mixed-channels":
        x[:4] = x[:4].abs()  # some channels all positive: the whole tensor is two-sided, so they are too
    channel_wise = kind != "activation"
    q = UniformQuantizer(bits, symmetric=True, channel_wise=channel_wise, init="lp")
    q.init_from(x)
    delta, zp = official_1d_search(x, bits, channel_wise)
    assert torch.equal(q.delta.detach().flatten(), delta.flatten())
    assert torch.equal(q.zero_point.flatten(), zp.flatten())


def test_activation_side_is_kept_from_the_first_batch():
    """The official quantizer decides one_side_dist on its first input and keeps it: a later batch with a few
    negatives keeps the [0, thres] range of a post-ReLU-like activation."""
    q = UniformQuantizer(8, symmetric=True, init="lp")
    q.calibrating = True
    q(torch.rand(1000))
    assert q.side == "pos" and float(q.zero_point) == 0
    q(torch.rand(1000) - 0.01)
    assert q.side == "pos" and float(q.zero_point) == 0


def official_qdiff_max(x: torch.Tensor, n_bits: int, symmetric: bool, channel_wise: bool):
    """Q-Diffusion `qdiff/quant_layer.py::UniformAffineQuantizer.init_quantization_scale`, 'max' branch, per
    channel as its loop: (delta, zero_point, code range)."""
    def one(t):
        x_min, x_max = min(t.min().item(), 0), max(t.max().item(), 0)
        if symmetric:
            n_levels = 2 ** (n_bits - 1) - 1
            delta, zp = max(abs(x_min), x_max) / n_levels, 0.0
        else:
            n_levels = 2**n_bits
            delta = float(t.max().item() - t.min().item()) / (n_levels - 1)
            delta = max(delta, 1e-8)
            zp = round(-x_min / delta)
        return delta, zp

    rows = x.flatten(1) if channel_wise else x.reshape(1, -1)
    return [one(r) for r in rows]


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdiff_max_matches_qdiffusion(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g) + torch.linspace(-1, 1, 6)[:, None, None, None]
    w[2] = w[2].abs() + 0.1  # a channel without zero in its range
    q = UniformQuantizer(4, symmetric=symmetric, channel_wise=True, init="qdiff-max")
    q.init_from(w)
    ref = official_qdiff_max(w, 4, symmetric, True)
    for c, (delta, zp) in enumerate(ref):
        assert float(q.delta[c]) == pytest.approx(delta, rel=1e-6)
        # our unsigned codes put Q-Diffusion's signed symmetric grid [-8, 7] at zero point 2^(b-1)
        assert float(q.zero_point[c]) == (8 if symmetric else zp)
    x = w.clone()
    deq = q(x)
    for c, (delta, zp) in enumerate(ref):  # Q-Diffusion's forward on the same grid
        lo, hi = (-8, 7) if symmetric else (0, 15)
        xi = torch.round(x[c] / delta) + (0 if symmetric else zp)
        expect = (torch.clamp(xi, lo, hi) - (0 if symmetric else zp)) * delta
        assert torch.allclose(deq[c], expect, atol=1e-6)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("bits,zp", [(8, 128.0), (4, 0.0), (3, 4.0)])
def test_fused_training_path_matches_autograd_of_the_formula(bits, zp, drop, monkeypatch):
    """LSQ step-size gradient, STE input gradient and QDrop mask: the fused Function equals autograd of
    `(clamp(round_ste(x / d) + z, 0, 2^b - 1) - z) * d` (values bit for bit, gradients to float rounding)."""
    import eda.quantizer as qm

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 6, 5, 5, generator=g) * 3
    grad_out = torch.randn(4, 6, 5, 5, generator=g)
    keep = (torch.rand(4, 6, 5, 5, generator=g) < 0.5).float() if drop else None
    results = []
    for fused in (True, False):
        monkeypatch.setattr(qm, "FUSED_TRAINING", fused)
        q = UniformQuantizer(bits, symmetric=True, init="minmax")
        q.set_range(torch.tensor(-2.0), torch.tensor(2.0), x)
        q.zero_point = torch.tensor(zp)
        q.learn_delta(True)
        xi = x.clone().requires_grad_(True)
        y = q.fake_quant(xi, keep)
        (y * grad_out).sum().backward()
        results.append((y.detach(), xi.grad, q.delta.grad))
    (y1, gx1, gd1), (y2, gx2, gd2) = results
    assert torch.equal(y1, y2)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=0)  # autograd computes g * d / d
    assert (gx1 == 0).any() and (gx1 != 0).any()  # some elements clipped, some inside
    d = 4.0 / (2**bits - 1)
    r = torch.round(x / d)
    inside = (r > -zp) & (r < 2**bits - 1 - zp)  # strictly: torch.clamp passes no gradient at its bounds
    c = r.clamp(-zp, 2**bits - 1 - zp)
    per = torch.where(inside, c - x / d, c)
    if keep is not None:
        per = per.masked_fill(keep.bool(), 0.0)
    assert torch.allclose(gd1, (grad_out * per).sum(), rtol=1e-5, atol=1e-4)  # LSQ's step-size gradient
    assert torch.allclose(gd1, gd2, rtol=1e-5, atol=1e-4)
