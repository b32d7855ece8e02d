"""AdaRound weight rounding (Nagel et al. 2020) as used by BRECQ / Q-Diffusion / EDA-DM.

Rectified sigmoid h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1) with zeta = 1.1, gamma = -0.1;
alpha is initialised so that h(alpha) equals the fractional part of w / delta, i.e. the soft weight starts at the
FP weight (clipped to the grid). Delta and zero point come from the range-initialised `UniformQuantizer` and are not
learned (`qdiff/adaptive_rounding.py::AdaRoundQuantizer`). The optional regulariser sum(1 - |2h - 1|^b) with b annealed 20 -> 2 after a warm-up is
what BRECQ/Q-Diffusion use; EDA-DM disables it (loss_mode='none'). After the unit, `harden()` fixes
rounding up where alpha >= 0.
"""

from __future__ import annotations

import torch
from torch import nn

from eda.quantizer import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantizer(nn.Module):
    """Learned up/down rounding for one weight tensor, on the grid of `base`."""

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor):
        super().__init__()
        if not base.initialized:
            base.init_from(weight)
        self.n_bits, self.channel_wise = base.n_bits, base.channel_wise
        self.register_buffer("delta", base.delta.detach().clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        self.enabled = True
        self.soft_targets = True
        rest = weight.detach() / self.delta - torch.floor(weight.detach() / self.delta)
        # h(alpha) = rest  <=>  alpha = -log((zeta - gamma) / (rest - gamma) - 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    @property
    def n_levels(self) -> int:
        return 2**self.n_bits

    @property
    def initialized(self) -> bool:
        return True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _codes(self, w: torch.Tensor, soft: bool) -> torch.Tensor:
        up = self.h() if soft else (self.alpha >= 0).to(w.dtype)
        return torch.clamp(torch.floor(w / self.delta) + up + self.zero_point, 0, self.n_levels - 1)

    def quantize_int(self, w: torch.Tensor) -> torch.Tensor:
        return self._codes(w.detach(), soft=False).detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return (self._codes(w, self.soft_targets) - self.zero_point) * self.delta

    def reg_loss(self, b: float) -> torch.Tensor:
        """Rounding regulariser sum(1 - |2 h(alpha) - 1|^b) (pushes h to 0 or 1)."""
        return (1 - (2 * self.h() - 1).abs().pow(b)).sum()

    def harden(self):
        self.soft_targets = False
        self.alpha.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, soft={self.soft_targets}"


def annealed_b(count: int, iters: int, warmup: float, b_range=(20.0, 2.0)) -> float | None:
    """BRECQ's LossFunction + LinearTempDecay (`qdiff/block_recon.py`): at iteration `count` (counted from 1, as the
    official `self.count += 1` before use), None (no rounding loss) while count < warmup * iters, then b falls
    linearly from b_range[0] to b_range[1] at count = iters."""
    start = warmup * iters
    if count < start:
        return None
    if iters <= start:
        return float(b_range[1])
    frac = (count - start) / (iters - start)
    return b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1 - frac)
