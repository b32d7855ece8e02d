"""PTQ4DM's NDTC step sampling: the histogram matches its (clamped, floored) normal distribution."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from baselines.ptq4dm import ndtc_pmf, ndtc_steps
from bench.errors import UsageError

torch.set_num_threads(1)


def _ks_pvalue(steps: torch.Tensor, pmf: torch.Tensor, seed: int = 0) -> float:
    """KS on continuous values: integer steps + U[0,1) jitter against the piecewise-linear CDF of the pmf."""
    rng = np.random.default_rng(seed)
    x = steps.numpy().astype(np.float64) + rng.random(len(steps))
    cum = np.concatenate([[0.0], np.cumsum(pmf.numpy())])
    grid = np.arange(len(cum), dtype=np.float64)
    return stats.kstest(x, lambda v: np.interp(v, grid, cum)).pvalue


@pytest.mark.parametrize("mode,S", [("paper", 100), ("official", 100), ("paper", 20), ("official", 250)])
def test_histogram_matches_distribution(mode, S):
    steps = ndtc_steps(4000, S, mode, seed=3)
    assert steps.min() >= 0 and steps.max() <= S - 1
    pmf = ndtc_pmf(S, mode)
    assert math.isclose(float(pmf.sum()), 1.0, abs_tol=1e-9)
    assert _ks_pvalue(steps, pmf) > 0.01


def test_ks_detects_the_other_mode():
    steps = ndtc_steps(4000, 100, "official", seed=0)
    assert _ks_pvalue(steps, ndtc_pmf(100, "paper")) < 1e-6


def test_paper_mode_is_centred_with_sqrt_half_T_spread():
    S = 100
    steps = ndtc_steps(20000, S, "paper", seed=0).double()
    # mu = T/2 measured as the paper's t (t = S-1-index): index mean ~ S-1-S/2-0.5, std ~ sqrt(T/2)
    assert abs(steps.mean().item() - (S - 1 - S / 2 + 0.5)) < 0.3
    assert abs(steps.std().item() - math.sqrt(S / 2)) < 0.3


def test_official_mode_clamps_about_16_and_7_percent():
    S = 250
    steps = ndtc_steps(50000, S, "official", seed=0)
    assert abs((steps == 0).double().mean().item() - stats.norm.cdf(-1.0)) < 0.01  # x < 0 <=> z < -1
    assert abs((steps == S - 1).double().mean().item() - stats.norm.sf(1.5)) < 0.01  # x >= 1 <=> z >= 1.5


def test_paper_direction_small_mean_is_near_the_end():
    S = 100
    steps = ndtc_steps(2000, S, "paper", mean=0.1, seed=0)  # paper t small = late (clean) steps
    assert steps.double().mean() > 0.8 * S


def test_seeded():
    assert torch.equal(ndtc_steps(100, 50, seed=1), ndtc_steps(100, 50, seed=1))
    assert not torch.equal(ndtc_steps(100, 50, seed=1), ndtc_steps(100, 50, seed=2))


def test_bad_mode():
    with pytest.raises(UsageError):
        ndtc_steps(10, 10, "skewed")
    with pytest.raises(UsageError):
        ndtc_pmf(10, "paper", std=0.0)
