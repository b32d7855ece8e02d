"""eda.convergence: the plateau rule on curves of known shape, the row summary, and the converged budget."""

import math

import pytest
import torch

from eda.convergence import plateaued, summarize, window_size


def test_plateau_rule_on_known_curves():
    n = 400
    w = window_size(n)
    settled = [1.0 + 10 * math.exp(-i / 20) for i in range(n)]  # done within the first quarter
    still_falling = [10.0 - 0.02 * i for i in range(n)]  # linear: half the decrease in the second half
    slow = [1.0 + 10 * math.exp(-i / 300) for i in range(n)]  # decays on the scale of the whole run
    flat = [3.0] * n
    rising = [1.0 + 0.01 * i for i in range(n)]
    assert plateaued(settled, w) and not plateaued(still_falling, w) and not plateaued(slow, w)
    assert plateaued(flat, w) and plateaued(rising, w)
    assert not plateaued(settled[:30], w)  # fewer than 4 windows: too short to judge
    assert not plateaued(settled[:-1] + [math.nan] * 30, w)


def test_noise_does_not_hide_a_plateau():
    g = torch.Generator().manual_seed(0)
    n = 1000
    noisy = [1.0 + 5 * math.exp(-i / 50) + 0.3 * float(torch.rand(1, generator=g)) for i in range(n)]
    assert plateaued(noisy, window_size(n))


def test_summary_keeps_window_means_and_a_short_curve():
    losses = [float(10 - i / 100) for i in range(5000)]
    s = summarize(losses, 5000)
    assert s["iters"] == 5000 and s["window"] == 250 and len(s["curve"]) == 20
    assert s["first"] == pytest.approx(sum(losses[:250]) / 250) and s["best"] == losses[-1]
    assert not s["plateaued"]
    long = summarize([1.0] * 200_000, 200_000)
    assert len(long["curve"]) <= 50


def test_converged_budget_stops_a_settled_unit_early():
    """On a tiny UNet a block converges long before a generous cap: the converged budget stops it there, the
    fraction budget runs the cap."""
    from eda.policy import BitPolicy
    from eda.recon import ReconConfig, reconstruct
    from eda.trajectories import CalibSet
    from eda.units import reconstruction_units
    from eda.wrap import init_ranges, quantize_unet
    from tests.conftest import make_tiny_unet

    fp = make_tiny_unet(width=8)
    g = torch.Generator().manual_seed(0)
    calib = CalibSet(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 1000, (32,), generator=g))
    runs = {}
    for budget, reg in (("fraction", None), ("converged", None), ("converged", 0.01)):
        q = quantize_unet(fp, BitPolicy.from_bits("W4A8", w_init="minmax", a_init="minmax"))
        init_ranges(q, calib, batch_size=32)
        unit = reconstruction_units(q)[3].name
        cfg = ReconConfig(iters=240, batch_size=4, lr_w=0.5, lr_a=1e-3, loss="mse", only=(unit,), budget=budget,
                          eval_mse=False, adaround_reg=reg)
        runs[budget, reg] = reconstruct(q, fp, calib, cfg, progress=False)["units"][unit]["loss"]
    assert runs["fraction", None]["iters"] == 240
    assert 24 <= runs["converged", None]["iters"] < 240 and runs["converged", None]["plateaued"]
    # With the AdaRound regulariser the temperature schedule spans the cap: a unit never stops before it.
    assert runs["converged", 0.01]["iters"] == 240
