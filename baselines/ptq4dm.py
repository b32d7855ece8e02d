"""PTQ4DM (Shang et al., CVPR 2023): NDTC calibration + BRECQ/QDrop reconstruction (baselines.md §2).

NDTC (Normally Distributed Time-step Calibration) draws one calibration step per FP trajectory from a normal
distribution over the S sampling steps and keeps that trajectory's x_t at it (as `backward_t_calib_data_generator`
does: one sampling loop over all N = 1024 samples, each kept at its own step).

Two readings of the distribution (`ndtc`):
- "paper" (default; Algorithm 1, Eq. 15): t ~ N(mu, sqrt(T/2)) with mu <= T/2, rounded down and clamped, where t is
  the paper's time index: t = T-1 is the noisiest UNet input (x_T) and t = 0 the last one. T is the number of
  sampling steps S, as the official code's `num_timesteps` after respacing. mu defaults to the bound T/2
  (`ndtc_mean` 0.5 of T) and the standard deviation to sqrt(T/2) (the paper's "N(mu, T/2)" read as a variance).
  Step index (0 = noisiest) = S - 1 - t.
- "official" (`quant_sample_ddim_in_backward_DNTC.sh`): t = int(N(0.4, 0.4) * T) clamped to [0, T-1], where t is
  the sampling-loop index counted from x_T (the opposite direction to the paper's t), and the std is 0.4 T rather
  than sqrt(T/2) (PTQ4DM issue #6). About 16% of the draws clamp to x_T and 7% to the last step.
  We do not reproduce the official code's second bug (the UNet saw respaced t in [0, 249] at calibration but
  ~4t at sampling): our trajectories are recorded with the same time embedding as sampling.

Reconstruction:
- `official_scripts=False` (default): what the paper describes, via the QDrop code it ships: block-wise
  reconstruction with AdaRound (regulariser 0.01, b 20 -> 2, warm-up 0.2; Adam lr 1e-3 on alpha), jointly learned
  activation step sizes (QDrop's lr 4e-5, cosine), QDrop drop p = 0.5 on activations and block input,
  `iters` 20000 per block (QDrop's default; the shipped script's `--iters_w 100` is never used, see below).
- `official_scripts=True`: the shipped scripts omit `--use_adaround`, so `quant_model()` returns after the MSE
  (L_2.4) range initialisation of weights and activations: no reconstruction runs.

Quantizers as in the QDrop code: symmetric, per-channel weights / per-tensor activations, L_p (p = 2.4) range search,
first and last weight layers at 8 bit, network output unquantized. The attention matmuls (and improved-diffusion's
Conv1d qkv/proj) are not quantized by the official code, so `quantize_attention=False`. Deviation: QDrop quantizes
each layer's *output*, the shared core quantizes layer *inputs* (as Q-Diffusion and EDA-DM do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.errors import UsageError
from eda.registry import PTQMethod, register_method

NDTC_MODES = ("paper", "official")


def _ndtc_params(n_steps: int, mode: str, mean: float | None, std: float | None) -> tuple[float, float]:
    """(mu, sigma) in steps for the normal the draws come from."""
    if mode not in NDTC_MODES:
        raise UsageError(f"unknown ndtc mode {mode!r}; expected one of {', '.join(NDTC_MODES)}")
    if mode == "paper":
        mu = (0.5 if mean is None else mean) * n_steps
        sigma = math.sqrt(n_steps / 2) if std is None else std * n_steps
    else:
        mu = (0.4 if mean is None else mean) * n_steps
        sigma = (0.4 if std is None else std) * n_steps
    if not sigma > 0:
        raise UsageError(f"ndtc_std must be > 0, got {std}")
    return mu, sigma


def ndtc_steps(n: int, n_steps: int, mode: str = "paper", mean: float | None = None, std: float | None = None,
               seed: int = 0) -> torch.Tensor:
    """Step index (0 = noisiest, x_T) for each of n trajectories. mean / std are fractions of n_steps
    (None = the mode's default: paper 0.5 and sqrt(T/2)/T, official 0.4 and 0.4)."""
    mu, sigma = _ndtc_params(n_steps, mode, mean, std)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * sigma + mu
    t = torch.floor(x).clamp(0, n_steps - 1).to(torch.long)  # official: int() then clamp; same after the clamp
    return (n_steps - 1 - t) if mode == "paper" else t


def ndtc_pmf(n_steps: int, mode: str = "paper", mean: float | None = None, std: float | None = None) -> torch.Tensor:
    """Probability of each step index (0 = noisiest) under `ndtc_steps`, clamping mass included (plots, tests)."""
    mu, sigma = _ndtc_params(n_steps, mode, mean, std)
    edges = torch.arange(1, n_steps, dtype=torch.float64)  # floor(x) = t  <=>  t <= x < t + 1
    cdf = 0.5 * (1 + torch.erf((edges - mu) / (sigma * math.sqrt(2))))
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf, torch.ones(1, dtype=torch.float64)])
    pmf = cdf[1:] - cdf[:-1]  # over t = 0..S-1, the clamps putting the tails on the end values
    return pmf.flip(0) if mode == "paper" else pmf


@register_method("ptq4dm")
@dataclass(frozen=True)
class PTQ4DM(PTQMethod):
    """NDTC calibration (N = 1024) + QDrop-style block reconstruction; `official_scripts=True` stops after init."""

    ndtc: str = "paper"  # "paper" (Eq. 15) or "official" (N(0.4, 0.4) of T from x_T)
    ndtc_mean: float | None = None  # fraction of T; None = the mode's default (paper 0.5, official 0.4)
    ndtc_std: float | None = None  # fraction of T; None = the mode's default (paper sqrt(T/2)/T, official 0.4)
    official_scripts: bool = False  # True: MSE range init only, as the shipped scripts run
    iters: int = 20000  # QDrop default per block (the script's --iters_w 100 is never reached)
    batch_size: int = 32
    lr_w: float = 1e-3  # Adam default on AdaRound alpha (QDrop)
    lr_a: float = 4e-5  # QDrop --lr for the activation step sizes, cosine decay
    adaround_reg: float = 0.01  # shipped script --weight 0.01
    qdrop_prob: float = 0.5  # --prob 0.5
    input_prob: float = 0.5  # --input_prob 0.5
    quantize_attention: bool = False  # the official UNet's attention matmuls stay FP

    def validate(self) -> None:
        super().validate()
        _ndtc_params(2, self.ndtc, self.ndtc_mean, self.ndtc_std)
        if self.iters < 1 or self.batch_size < 1:
            raise UsageError(f"iters and batch_size must be >= 1, got {self.iters} and {self.batch_size}")

    def select(self, model, trajectories, seed: int):
        self.check_trajectories(trajectories, self.n_samples)
        S, N = trajectories.xs.shape[:2]
        steps = ndtc_steps(self.n_samples, S, self.ndtc, self.ndtc_mean, self.ndtc_std, seed=seed)
        step_of_sample = torch.cat([steps, torch.full((N - self.n_samples,), -1, dtype=torch.long)])
        allocation = torch.bincount(steps, minlength=S).tolist()
        return trajectories.select(step_of_sample), allocation, {}

    def stages(self, bits: str, seed: int) -> list:
        from eda.recon import ReconConfig
        from eda.registry import Stage

        if self.official_scripts:
            return []
        cfg = ReconConfig(iters=self.scaled(self.iters), batch_size=self.batch_size, lr_w=self.lr_w, lr_a=self.lr_a,
                          loss="mse", qdrop_prob=self.qdrop_prob, input_prob=self.input_prob,
                          adaround_reg=self.adaround_reg, b_range=(20, 2), warmup=0.2, learn_weights=True,
                          learn_act_delta=True, asym=True, seed=seed)
        return [Stage("qdrop", cfg, weights=True, acts=True)]
