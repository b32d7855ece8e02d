"""PTQ4DM's NDTC step sampling: the official truncation (no clamp, out-of-range draws dropped), the paper's clamped
floor, and histograms matching their distributions."""

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


def official_generate_t(n: int, S: int, seed: int, mean=0.4, std=0.4) -> torch.Tensor:
    """`quant_image_sample.py::generate_t('normal')`, transcribed: normal * num_timesteps, `.type(torch.int)`
    (toward zero), no clamp; `backward_t_calib_data_generator` keeps a sample where `now_rt == t` for now_rt in
    0..S-1, so any other t matches nothing (-1 here). The draws come from the same seeded stream as ours."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g, dtype=torch.float64) * (std * S) + mean * S).type(torch.int).long()
    return torch.where((t >= 0) & (t <= S - 1), t, -1)


@pytest.mark.parametrize("S", [20, 100, 250])
def test_official_steps_match_the_transcription(S):
    assert torch.equal(ndtc_steps(5000, S, "official", seed=7), official_generate_t(5000, S, seed=7))


@pytest.mark.parametrize("mode,S", [("paper", 100), ("official", 100), ("paper", 20), ("official", 250)])
def test_histogram_matches_distribution(mode, S):
    steps = ndtc_steps(4000, S, mode, seed=3)
    pmf = ndtc_pmf(S, mode)
    if mode == "paper":
        assert steps.min() >= 0 and steps.max() <= S - 1
        assert math.isclose(float(pmf.sum()), 1.0, abs_tol=1e-9)
    else:
        assert abs((steps < 0).double().mean().item() - (1 - float(pmf.sum()))) < 0.02  # dropped mass
        steps, pmf = steps[steps >= 0], pmf / pmf.sum()
    assert _ks_pvalue(steps, pmf) > 0.01


def test_ks_detects_the_other_mode():
    steps = ndtc_steps(4000, 100, "official", seed=0)
    assert _ks_pvalue(steps[steps >= 0], ndtc_pmf(100, "paper")) < 1e-6


def test_paper_mode_is_centred_with_sqrt_half_T_spread():
    S = 100
    steps = ndtc_steps(20000, S, "paper", seed=0).double()
    # mu = T/2 measured as the paper's t (t = S-1-index): index mean ~ S-1-S/2-0.5, std ~ sqrt(T/2)
    assert abs(steps.mean().item() - (S - 1 - S / 2 + 0.5)) < 0.3
    assert abs(steps.std().item() - math.sqrt(S / 2)) < 0.3


def test_official_mode_drops_about_16_and_7_percent():
    S = 250
    steps = ndtc_steps(50000, S, "official", seed=0)
    x = official_generate_t(50000, S, seed=0)
    assert torch.equal(steps, x)
    # below: x <= -1 <=> z <= -1 - 1/(0.4 S); above: x >= S <=> z >= 1.5 (both matched by no loop index)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50000, generator=g, dtype=torch.float64)
    below = (z * 0.4 * S + 0.4 * S <= -1).double().mean().item()
    assert abs(below - stats.norm.cdf(-1 - 1 / (0.4 * S))) < 0.01 and abs(below - 0.16) < 0.01
    assert abs((steps < 0).double().mean().item() - (below + stats.norm.sf(1.5))) < 0.01
    assert (steps == 0).double().mean().item() < 0.01  # only -1 < x < 1: no clamped pile at x_T


def test_paper_direction_small_mean_is_near_the_end():
    S = 100
    steps = ndtc_steps(2000, S, "paper", mean=0.1, seed=0)  # paper t small = late (clean) steps
    assert steps.double().mean() > 0.8 * S


def test_seeded():
    assert torch.equal(ndtc_steps(100, 50, seed=1), ndtc_steps(100, 50, seed=1))
    assert not torch.equal(ndtc_steps(100, 50, seed=1), ndtc_steps(100, 50, seed=2))


def test_ptq4dm_defaults_are_the_shipped_script():
    from eda.registry import get_method

    m = get_method("ptq4dm").configure(bits="W8A8")
    assert (m.ndtc, m.official_scripts, m.split_shortcut, m.quantize_attention) == ("official", True, False, False)
    assert m.first_last_8bit == "official" and m.stages("W8A8", 0) == []


def test_bad_mode():
    with pytest.raises(UsageError):
        ndtc_steps(10, 10, "skewed")
    with pytest.raises(UsageError):
        ndtc_pmf(10, "paper", std=0.0)
