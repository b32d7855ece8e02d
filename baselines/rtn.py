"""`rtn`: round-to-nearest with min-max or L_p (MSE, p = 2.4) ranges and no reconstruction: the floor every
method must beat (Q-Diffusion's "Linear Quant" baseline is channel-wise RTN).

Calibration only sets the ranges: `n_samples` samples spread uniformly over the sampling steps, one per trajectory
(the same uniform allocation as the `eda-dm:fbr-only` ablation). The policy matches EDA-DM's (symmetric, first and
last weight layers at 8 bit, shortcut split, output-conv input FP) so that RTN differs from the methods only in
the absence of reconstruction; `init` picks the range estimator for weights and activations alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from eda.errors import UsageError
from eda.registry import PTQMethod, register_method


def uniform_selection(trajectories, n_samples: int, seed: int):
    """n_samples trajectories, one sample each, spread evenly over the steps (shuffled, seeded)."""
    import torch

    from eda.tdac import assign_steps, counts_from_weights

    S, N = trajectories.xs.shape[:2]
    counts = counts_from_weights(torch.ones(S), n_samples)
    labels = assign_steps(counts, N, seed=seed)
    return trajectories.select(labels), counts.tolist()


@register_method("rtn")
@dataclass(frozen=True)
class RoundToNearest(PTQMethod):
    """Round-to-nearest: range initialisation only."""

    init: str = "minmax"  # "minmax" or "lp" (L_2.4 range search, the official scripts' 'mse')
    n_samples: int = 256

    def validate(self) -> None:
        super().validate()
        if self.init not in ("minmax", "lp"):
            raise UsageError(f"rtn init must be 'minmax' or 'lp', got {self.init!r}")

    def policy(self, bits: str):
        return super().policy(bits).with_(w_init=self.init, a_init=self.init)

    def select(self, model, trajectories, seed: int):
        self.check_trajectories(trajectories, self.n_samples)
        calib, allocation = uniform_selection(trajectories, self.n_samples, seed)
        return calib, allocation, {}
