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


def test_annealed_b():
    assert annealed_b(0, 100, 0.2) is None
    assert annealed_b(20, 100, 0.2) == pytest.approx(20.0)
    assert annealed_b(100, 100, 0.2) == pytest.approx(2.0)


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
