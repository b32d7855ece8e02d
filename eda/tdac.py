"""TDAC: Temporal Distribution Alignment Calibration (EDA-DM, arXiv 2401.04585; official `scripts/calibration.py`).

TDAC does not pick individual samples: it decides how many calibration samples come from each sampling step.
The features are the input of the UNet's middle attention (the mid-block ResBlock output) at every step, hooked
while the FP model samples N trajectories. Per step t:

- density   D_t = #{j != t : mean((F_t - F_j)^2) <= r}         (a radius count over steps, not k-NN)
- diversity V_t = sum_{j != t} sum_{n,h,w} (1 - cos_c(F_t, F_j)) (cosine over channels, per sample and pixel)
- both min-max normalised over the steps, w_t = D~_t + lam * V~_t, n_t = round(N w_t / sum w) (float32, as the
  official code computes them), then repaired once so the counts sum to N (`repair_counts`, the official code's
  rounding repair): with e = N - sum n_t, a deficit adds 1 to each of the e largest n_t (so no step gains more than
  1), a surplus subtracts 1 from non-zero steps walking backwards from the last step until the sum is N.

Degenerate cases (the official code divides by zero there): a criterion that is equal at every step does not
discriminate between steps, so its normalised value is 0 everywhere (min-max maps the minimum to 0; a constant
vector is all minimum). If every weight is then 0 (both criteria constant, or D constant and lam = 0), the
allocation is uniform over the steps. With r too small no pair is dense (D = 0 everywhere), with r too large every
pair is (D = T-1 everywhere): in both cases density drops out and TDAC allocates by diversity alone.
`tdac_scores(...)["dense_fraction"]` tells which regime a feature set is in for a given r.

Each FP trajectory contributes exactly one calibration sample, at the step its (seeded, shuffled) label assigns.

Deviations from `scripts/calibration.py::TDAC_cifar_calib_data_generator` (docs/fidelity.md):
- the pairwise MSEs and cosines come from float64 Gram matrices, not a float32 loop over step pairs (equal up to
  float rounding; a pair at exactly mse == r could flip);
- ties among equal n_t in the deficit repair go to the earlier (noisier) step: the official `torch.sort(t_num,
  descending=True)` is not stable, and its tie order depends on torch's CPU sort kernel (it differs with and without
  AVX-512), so allocations would differ between machines;
- a constant criterion normalises to 0 instead of 0/0 = NaN (see above).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eda.errors import UsageError

COS_EPS = 1e-6  # nn.CosineSimilarity(dim=1, eps=1e-6) in the official TDAC



def _stack(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, B, C, ...] on CPU from a stacked tensor or a per-step list (sampling order, noisiest first)."""
    if isinstance(features, torch.Tensor):
        f = features
    else:
        if len(features) == 0:
            raise UsageError("TDAC needs features for at least one sampling step; got an empty list")
        f = torch.stack([torch.as_tensor(x) for x in features])
    if f.dim() < 3:
        raise UsageError(f"TDAC features must be [T, B, C, ...] (steps, samples, channels, ...); got shape "
                         f"{tuple(f.shape)}")
    return f.detach().cpu()


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over steps in float32 (the official dtype); a constant vector maps to 0 (module docstring)."""
    x = x.to(torch.float32)
    lo, hi = x.min(), x.max()
    if not torch.isfinite(hi - lo) or float(hi - lo) <= 0.0:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def _grams(f: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, T] Gram matrices of the raw features and of the per-pixel channel-normalised features, accumulated
    in float64 over chunks of samples (CIFAR: 100 steps x 1024 x 256 x 4 x 4 would not fit twice in float64)."""
    T, B = f.shape[:2]
    gram = torch.zeros(T, T, dtype=torch.float64)
    cos = torch.zeros(T, T, dtype=torch.float64)
    for s in range(0, B, chunk):
        x = f[:, s:s + chunk].to(torch.float64)
        flat = x.reshape(T, -1)
        gram += flat @ flat.T
        # nn.CosineSimilarity(dim=1, eps=1e-6) on [B, C, H, W] as the official code builds it:
        # x.y / (max(|x|, eps) max(|y|, eps)); a zero vector gives 0.
        unit = (x / x.norm(dim=2, keepdim=True).clamp(min=COS_EPS)).reshape(T, -1)
        cos += unit @ unit.T
    return gram, cos


def _pairwise(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    gram, cos = _grams(f)
    sq = gram.diagonal()
    numel = f[0].numel()
    # mean((F_t - F_j)^2) from the Gram matrix; float64 keeps near-duplicates from cancelling badly.
    mse = ((sq[:, None] + sq[None, :] - 2.0 * gram) / numel).clamp(min=0.0).fill_diagonal_(0.0)
    pixels = f.shape[1] * f[0, 0, 0].numel()  # B * H * W positions per step
    return mse, cos, pixels


def pairwise_mse(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, T] matrix of mean((F_t - F_j)^2) over all elements (samples, channels, pixels)."""
    return _pairwise(_stack(features))[0]


def tdac_scores(features: torch.Tensor | Sequence[torch.Tensor], radius: float = 3.0,
                lam: float = 1.2) -> dict[str, torch.Tensor | float]:
    """Per-step TDAC criteria for plots and diagnostics: raw and normalised density and diversity, the weight w,
    and how many step pairs fall within the radius (`dense_fraction`: 0 or 1 means density is degenerate)."""
    if radius < 0:
        raise UsageError(f"TDAC radius must be >= 0, got {radius}")
    mse, cos, pixels = _pairwise(_stack(features))
    T = mse.shape[0]
    off = ~torch.eye(T, dtype=torch.bool)
    density = ((mse <= radius) & off).sum(1).to(torch.float64)
    diversity = ((pixels - cos) * off).sum(1)
    d_n, v_n = _minmax(density), _minmax(diversity)
    weight = d_n + lam * v_n
    off_vals = mse[off]
    return {
        "density": density, "diversity": diversity, "density_norm": d_n, "diversity_norm": v_n, "weight": weight,
        "dense_fraction": float((off_vals <= radius).double().mean()) if T > 1 else 0.0,
        "mse_min": float(off_vals.min()) if T > 1 else 0.0,
        "mse_median": float(off_vals.median()) if T > 1 else 0.0,
        "mse_max": float(off_vals.max()) if T > 1 else 0.0,
    }


def counts_from_weights(weight: torch.Tensor, n_samples: int) -> torch.Tensor:
    """n_t = round(N w_t / sum w) in float32 as the official code, then `repair_counts`; never negative. All-zero
    weights (both criteria constant) allocate uniformly."""
    w = weight.to(torch.float32).clamp(min=0.0)
    if not float(w.sum()) > 0.0:
        w = torch.ones_like(w)
    prob = w / torch.sum(w)
    return repair_counts(torch.round(prob * n_samples).to(torch.long), n_samples)


def repair_counts(counts: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The official rounding repair (`scripts/calibration.py`): e = N - sum(n).
    - e >= 0: +1 on each of the e largest counts (sorted descending; ties: the earlier step first, see the module
      docstring), so no step gains more than 1;
    - e < 0: walking backwards from the last step, -1 on every non-zero count until the sum is N.
    After rounding |e| <= T/2 and one pass always suffices; the loops only make the repair total for arbitrary
    counts (the official code then fails its `assert torch.sum(t_num) == calib_num_samples`)."""
    counts = torch.as_tensor(counts, dtype=torch.long).clone()
    T = counts.numel()
    error = n_samples - int(counts.sum())
    if error >= 0:
        order = torch.sort(counts, descending=True, stable=True).indices
        while error > 0:
            k = min(error, T)
            counts[order[:k]] += 1
            error -= k
        return counts
    while error < 0:
        for i in reversed(range(T)):
            if error == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                error += 1
    return counts


def allocate_steps(features: torch.Tensor | Sequence[torch.Tensor], n_samples: int, radius: float = 3.0,
                   lam: float = 1.2) -> torch.Tensor:
    """Per-step calibration counts (long [T], sums to n_samples). `features[t]` is the mid-attention input of all
    trajectories at sampling step t, noisiest first. Defaults: CIFAR-10 script (r 3.0, lambda 1.2)."""
    if n_samples < 0:
        raise UsageError(f"n_samples must be >= 0, got {n_samples}")
    return counts_from_weights(tdac_scores(features, radius, lam)["weight"], n_samples)


def assign_steps(counts: torch.Tensor, n_trajectories: int | None = None, seed: int = 0) -> torch.Tensor:
    """Step label per trajectory: n_t copies of t, shuffled with a seeded randperm (the official code's
    `randperm`); trajectories beyond sum(counts) get -1 (unused), so each contributes at most one sample."""
    counts = torch.as_tensor(counts, dtype=torch.long)
    labels = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    n = len(labels) if n_trajectories is None else n_trajectories
    if len(labels) > n:
        raise UsageError(f"TDAC allocated {len(labels)} samples but only {n} trajectories were recorded; record "
                         f"at least {len(labels)} or lower n_samples")
    g = torch.Generator().manual_seed(seed)
    labels = labels[torch.randperm(len(labels), generator=g)]
    return torch.cat([labels, torch.full((n - len(labels),), -1, dtype=torch.long)])


def plot_allocation(scores: dict, counts, path: str, title: str = "TDAC allocation") -> None:
    """n_t per step (bars) with the normalised density and diversity curves, as in the paper's figure. Takes
    `tdac_scores` output or the lists a method stores in `info["tdac"]` / `info["allocation"]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def as_list(v):
        return v.tolist() if torch.is_tensor(v) else list(v)

    steps = range(len(counts))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(steps, as_list(counts), color="#9bb7d4", label="n_t")
    ax.set_xlabel("sampling step (0 = x_T)")
    ax.set_ylabel("calibration samples n_t")
    ax2 = ax.twinx()
    ax2.plot(steps, as_list(scores["density_norm"]), color="#c0392b", label="density (norm.)")
    ax2.plot(steps, as_list(scores["diversity_norm"]), color="#27ae60", label="diversity (norm.)")
    ax2.set_ylim(-0.05, 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
