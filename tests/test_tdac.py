"""TDAC (eda.tdac): allocation on synthetic features with known structure, invariants, degenerate cases."""

import pytest
import torch

from bench.errors import UsageError
from eda.tdac import allocate_steps, assign_steps, counts_from_weights, pairwise_mse, tdac_scores

torch.set_num_threads(1)


def _features(T=10, B=8, C=4, H=3, W=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, C, H, W, generator=g) * 3.0  # far apart: pairwise MSE ~ 18 >> r


def test_pairwise_mse_matches_direct():
    f = _features(T=5)
    direct = torch.tensor([[((a - b) ** 2).mean().item() for b in f] for a in f], dtype=torch.float64)
    assert torch.allclose(pairwise_mse(f), direct, rtol=1e-6, atol=1e-8)


def test_near_duplicate_steps_raise_density():
    f = _features()
    for t in (3, 4, 5):  # three near-copies of one step: each has two neighbours within r
        f[t] = f[3] + 0.01 * torch.randn_like(f[3])
    s = tdac_scores(f, radius=3.0, lam=0.0)
    assert s["density"][3:6].tolist() == [2.0, 2.0, 2.0]
    assert s["density"].sum() == 6
    counts = allocate_steps(f, 90, radius=3.0, lam=0.0)
    assert counts[3:6].tolist() == [30, 30, 30] and counts.sum() == 90


def test_outlier_step_raises_diversity():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 8, 4, 3, 3, generator=g)
    f = base.repeat(10, 1, 1, 1, 1) + 0.05 * torch.randn(10, 8, 4, 3, 3, generator=g)
    f[7] = torch.randn(8, 4, 3, 3, generator=g)  # directions unrelated to the others: cosine ~ 0
    s = tdac_scores(f, radius=0.0, lam=1.0)
    assert int(torch.argmax(s["diversity"])) == 7
    assert s["diversity_norm"][7] == 1.0
    counts = allocate_steps(f, 100, radius=0.0, lam=1.0)
    assert int(torch.argmax(counts)) == 7


def test_list_and_stacked_inputs_agree():
    f = _features()
    assert torch.equal(allocate_steps(list(f), 64, 3.0, 1.2), allocate_steps(f, 64, 3.0, 1.2))


@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000, 1023])
def test_counts_sum_and_non_negative(n):
    f = _features(T=13)
    counts = allocate_steps(f, n, radius=20.0, lam=1.2)
    assert counts.dtype == torch.long and counts.sum() == n and (counts >= 0).all()


def test_repair_on_weights_with_rounding_surplus_and_deficit():
    assert counts_from_weights(torch.tensor([1.0, 1.0, 1.0]), 10).sum() == 10  # deficit: 3 x round(3.33)
    assert counts_from_weights(torch.tensor([1.0, 1.0, 0.0, 0.0]), 3).tolist() in ([2, 1, 0, 0], [1, 2, 0, 0])
    c = counts_from_weights(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0]), 6)  # 4 x round(1.5)=2 -> surplus 2
    assert c.sum() == 6 and (c >= 0).all() and c[4] == 0


def test_degenerate_all_equal_features_give_uniform_allocation():
    f = torch.ones(8, 4, 3, 2, 2)  # every step identical: D and V constant
    s = tdac_scores(f, 3.0, 1.2)
    assert torch.all(s["density_norm"] == 0) and torch.all(s["diversity_norm"] == 0)
    assert s["dense_fraction"] == 1.0
    counts = allocate_steps(f, 80, 3.0, 1.2)
    assert counts.tolist() == [10] * 8


def test_degenerate_radius_drops_density_out():
    f = _features()
    none_dense = tdac_scores(f, radius=0.0, lam=1.2)
    all_dense = tdac_scores(f, radius=1e9, lam=1.2)
    assert none_dense["dense_fraction"] == 0.0 and all_dense["dense_fraction"] == 1.0
    assert torch.equal(none_dense["weight"], all_dense["weight"])  # both = lam * V~
    assert torch.isfinite(allocate_steps(f, 50, 1e9, 1.2).float()).all()


def test_assign_steps_one_sample_per_trajectory():
    counts = torch.tensor([3, 0, 5, 2])
    labels = assign_steps(counts, n_trajectories=12, seed=0)
    assert labels.shape == (12,)
    assert (labels == -1).sum() == 2  # unused trajectories
    assert torch.bincount(labels[labels >= 0], minlength=4).tolist() == [3, 0, 5, 2]
    assert torch.equal(labels, assign_steps(counts, 12, seed=0))
    assert not torch.equal(labels, assign_steps(counts, 12, seed=1))


def test_assign_steps_too_few_trajectories():
    with pytest.raises(UsageError):
        assign_steps(torch.tensor([5, 5]), n_trajectories=4)


def test_bad_inputs():
    with pytest.raises(UsageError):
        allocate_steps(torch.zeros(3, 4), 10)
    with pytest.raises(UsageError):
        allocate_steps([], 10)


def test_plot_allocation_from_scores_and_lists(tmp_path):
    from eda.tdac import plot_allocation

    f = _features()
    s = tdac_scores(f, 20.0, 1.2)
    c = counts_from_weights(s["weight"], 64)
    plot_allocation(s, c, str(tmp_path / "a.png"))
    plot_allocation({k: (v.tolist() if torch.is_tensor(v) else v) for k, v in s.items()}, c.tolist(),
                    str(tmp_path / "b.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
