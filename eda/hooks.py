"""What a sampling hook sees: the sampler (bench.models.sampling) calls each hook once per step with a StepRecord.

Defined here, in the method library, because calibration (eda.trajectories.record_trajectories) is written against
it; the sampler that fills it in is the application's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepRecord:
    """What a hook sees at one sampling step (index 0 is the noisiest step, x_T)."""

    index: int
    t: int
    x_t: torch.Tensor
    eps: torch.Tensor
    offset: int = 0  # position of this batch's first sample in the whole sample set
