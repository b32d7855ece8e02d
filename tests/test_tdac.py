"""TDAC (eda.tdac): allocation on synthetic features with known structure, invariants, degenerate cases."""

import pytest
import torch

from bench.errors import UsageError
from eda.tdac import allocate_steps, assign_steps, counts_from_weights, pairwise_mse, repair_counts, tdac_scores

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


# ---- pinned against an independent transcription of the published algorithm ----------------------------------------
def official_allocation(features, n: int, lam: float, radius: float) -> torch.Tensor:
    """TDAC as `scripts/calibration.py::TDAC_cifar_calib_data_generator` computes it, written out loop by loop in
    float32 over step pairs (no Gram matrices). Differs from the official code only where docs/fidelity.md says so:
    a constant criterion normalises to 0 (not NaN) and ties in the deficit repair go to the earlier step."""
    from torch import nn

    F = [f.float() for f in features]
    T = len(F)
    dense = torch.zeros(T, dtype=torch.int16)
    for i in range(T):
        for j in range(T):
            if i != j and torch.mean((F[i] - F[j]) ** 2) <= radius:
                dense[i] += 1
    cos = nn.CosineSimilarity(dim=1, eps=1e-6)
    div = torch.zeros(T)
    for i in range(T):
        for j in range(T):
            if i != j:
                div[i] += torch.sum(1 - cos(F[i], F[j]))

    def norm(v):
        v = v.float()
        return torch.zeros_like(v) if v.max() == v.min() else (v - v.min()) / (v.max() - v.min())

    w = norm(dense) + lam * norm(div)
    prob = w / torch.sum(w)
    t_num = torch.round(prob * n).to(torch.long)
    err = n - int(t_num.sum())
    if err >= 0:
        t_num[torch.sort(t_num, descending=True, stable=True).indices[:err]] += 1
    else:
        for i in reversed(range(T)):
            if err == 0:
                break
            if t_num[i] > 0:
                t_num[i] -= 1
                err += 1
    assert t_num.sum() == n
    return t_num


def _structured(T=12, B=6, seed=3):
    """Features drifting over steps (a smooth trajectory plus noise), so densities and diversities vary."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 8, 2, 2, generator=g)
    steps = [base * (1 - t / T) + 0.9 * (t / T) * torch.randn(B, 8, 2, 2, generator=g) for t in range(T)]
    return torch.stack(steps) * 2.0


@pytest.mark.parametrize("n,lam,radius", [(1024, 1.2, 3.0), (256, 1.2, 3.0), (100, 5.0, 1.0), (7, 1.2, 3.0),
                                          (13, 0.0, 6.0), (37, 1.0, 0.3)])
def test_allocation_matches_the_official_algorithm(n, lam, radius):
    f = _structured()
    assert allocate_steps(f, n, radius, lam).tolist() == official_allocation(list(f), n, lam, radius).tolist()


def test_deficit_adds_at_most_one_per_step():
    """The official repair spreads a deficit over the e largest steps (+1 each); the old repair piled it on one."""
    w = torch.ones(100)
    counts = counts_from_weights(w, 1024)  # round(10.24) = 10 each: deficit 24
    assert counts.sum() == 1024 and counts.max() == 11 and counts.min() == 10
    assert counts[:24].tolist() == [11] * 24  # all tied: the earliest (noisiest) steps get the +1
    rounded = torch.round(w / w.sum() * 1024).long()
    assert ((counts - rounded) >= 0).all() and ((counts - rounded) <= 1).all()


def test_surplus_walks_backwards_over_non_zero_steps():
    # N < S: round(0.64) = 1 for every step (surplus 36), so the last 36 steps go to 0
    counts = counts_from_weights(torch.ones(100), 64)
    assert counts.tolist() == [1] * 64 + [0] * 36
    # zeros are skipped on the way back, and the walk stops once the sum is N
    assert repair_counts(torch.tensor([3, 3, 2, 0, 0]), 6).tolist() == [3, 2, 1, 0, 0]
    assert repair_counts(torch.tensor([3, 3, 2, 0, 1]), 8).tolist() == [3, 3, 2, 0, 0]


def test_ties_go_to_the_earlier_step_and_deficits_larger_than_the_steps():
    assert repair_counts(torch.tensor([2, 5, 5, 2, 5]), 21).tolist() == [2, 6, 6, 2, 5]  # e = 2 of 3 tied
    assert repair_counts(torch.tensor([2, 5, 5, 2, 5]), 23).tolist() == [3, 6, 6, 2, 6]  # e = 4: then the tied 2s
    # e > T never follows from rounding (|e| <= T/2); the official code would fail its assert, ours repeats the pass
    assert repair_counts(torch.zeros(3, dtype=torch.long), 7).tolist() == [3, 2, 2]


def test_all_equal_densities_allocate_by_diversity():
    f = _structured()
    s = tdac_scores(f, radius=1e9, lam=1.0)  # every pair dense: D constant (official: 0/0 = NaN)
    assert torch.all(s["density_norm"] == 0)
    assert torch.equal(s["weight"], s["diversity_norm"])
    assert allocate_steps(f, 200, 1e9, 1.0).tolist() == official_allocation(list(f), 200, 1.0, 1e9).tolist()
