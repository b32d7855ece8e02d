"""PTQ4DM (Shang et al., CVPR 2023): NDTC calibration + (optionally) QDrop reconstruction.

NDTC (Normally Distributed Time-step Calibration) draws one calibration step per FP trajectory from a normal
distribution over the S sampling steps and keeps that trajectory's x_t at it, as
`improved-diffusion/scripts/quant_image_sample.py::backward_t_calib_data_generator` does (one sampling loop over all
N = 1024 samples, each kept where `now_rt == t`).

Two readings of the distribution (`ndtc`):
- "official" (default; `generate_t('normal')` with the shipped `quant_sample_ddim_in_backward_DNTC.sh`:
  `--calib_t_mode_normal_mean 0.4 --calib_t_mode_normal_std 0.4`): t = int(N(0.4, 0.4) * S), truncated toward zero
  by `.type(torch.int)`, where t is the sampling-loop index counted from x_T (index 0 = the noisiest input). The
  published PTQ4DM numbers come from this code. There is no clamp: a draw outside 0..S-1 (about 16% below, 7% above
  at these values) matches no loop index and leaves an all-zero calibration image at an out-of-range time step. We
  drop those draws instead (docs/fidelity.md), so the calibration set has the valid draws only (`info["ndtc_dropped"]`).
- "paper" (Algorithm 1, Eq. 15): t ~ N(mu, sqrt(T/2)) with mu <= T/2, rounded down and clamped, where t is the
  paper's time index: t = T-1 is the noisiest UNet input (x_T) and t = 0 the last one. mu defaults to the bound T/2
  (`ndtc_mean` 0.5 of T) and the standard deviation to sqrt(T/2) (the paper's "N(mu, T/2)" read as a variance); step
  index (0 = noisiest) = S - 1 - t. With S = 100 this puts no mass outside steps 32-67.
We do not reproduce the official code's second bug (the UNet saw respaced t in [0, 249] at calibration but ~4t at
sampling): our trajectories are recorded with the same time embedding as sampling.

Reconstruction (`official_scripts`):
- True (default): the shipped scripts omit `--use_adaround`, so `quant_model()` returns after the L_2.4 ('mse') range
  initialisation of the weights and then the activations (`set_weight_quantize_params`, `set_act_quantize_params`):
  no reconstruction runs.
- False: what `--use_adaround` would run in the same script: QDrop's `recon_model` on this UNet, which has no QDrop
  "special" blocks, so every Conv/Linear is reconstructed layer by layer (`layer_reconstruction`) with AdaRound
  (regulariser 0.01, b 20 -> 2, warm-up 0.2; Adam lr 1e-3 on alpha), jointly learned activation step sizes (lr 4e-5,
  cosine), QDrop drop p = 0.5 on activations and layer input. `iters` 20000 is QDrop's default; the shipped flags say
  `--iters_w 100`.

Quantizers as in the QDrop code: symmetric, per-channel weights / per-tensor activations, L_p (p = 2.4) range search,
first and last weight layers at 8 bit (`set_first_last_layer_to_8bit`: the time-embedding MLP's first Linear and the
output conv), network output unquantized (`disable_network_output_quantization`), no shortcut splitting (QDrop has
none). The attention matmuls (and improved-diffusion's Conv1d qkv/proj) are not quantized by the official code, so
`quantize_attention=False`. Deviation: QDrop quantizes each layer's *output*, the shared core quantizes layer
*inputs* (as Q-Diffusion and EDA-DM do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eda.errors import UsageError
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


def ndtc_steps(n: int, n_steps: int, mode: str = "official", mean: float | None = None, std: float | None = None,
               seed: int = 0) -> torch.Tensor:
    """Step index (0 = noisiest, x_T) for each of n trajectories, -1 for an official draw outside 0..S-1 (dropped).
    mean / std are fractions of n_steps (None = the mode's default: official 0.4 and 0.4, paper 0.5 and
    sqrt(T/2)/T)."""
    mu, sigma = _ndtc_params(n_steps, mode, mean, std)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * sigma + mu
    if mode == "paper":
        t = torch.floor(x).clamp(0, n_steps - 1).to(torch.long)  # round down, clamp (Algorithm 1)
        return n_steps - 1 - t
    t = torch.trunc(x).to(torch.long)  # `.type(torch.int)`: toward zero, so (-1, 1) -> 0
    return torch.where((t >= 0) & (t < n_steps), t, torch.full_like(t, -1))


def ndtc_pmf(n_steps: int, mode: str = "official", mean: float | None = None, std: float | None = None
             ) -> torch.Tensor:
    """Probability of each step index (0 = noisiest) under `ndtc_steps`; for "official" the mass of the dropped
    out-of-range draws is missing, so the pmf sums to less than 1 (plots, tests)."""
    mu, sigma = _ndtc_params(n_steps, mode, mean, std)

    def cdf(v):
        return 0.5 * (1 + torch.erf((torch.as_tensor(v, dtype=torch.float64) - mu) / (sigma * math.sqrt(2))))

    if mode == "paper":
        edges = torch.arange(1, n_steps, dtype=torch.float64)  # floor(x) = t  <=>  t <= x < t + 1
        c = torch.cat([torch.zeros(1, dtype=torch.float64), cdf(edges), torch.ones(1, dtype=torch.float64)])
        return (c[1:] - c[:-1]).flip(0)  # the clamps put the tails on the end values
    upper = cdf(torch.arange(1, n_steps + 1, dtype=torch.float64))  # trunc(x) = t >= 1  <=>  t <= x < t + 1
    lower = torch.cat([cdf(-1.0).reshape(1), upper[:-1]])  # trunc(x) = 0  <=>  -1 < x < 1
    return upper - lower


@register_method("ptq4dm")
@dataclass(frozen=True)
class PTQ4DM(PTQMethod):
    """NDTC calibration (N = 1024) + QDrop-style block reconstruction; `official_scripts=True` stops after init."""

    ndtc: str = "official"  # "official" (int(N(0.4, 0.4) * S) from x_T, the shipped script) or "paper" (Eq. 15)
    ndtc_mean: float | None = None  # fraction of T; None = the mode's default (official 0.4, paper 0.5)
    ndtc_std: float | None = None  # fraction of T; None = the mode's default (official 0.4, paper sqrt(T/2)/T)
    official_scripts: bool = True  # True: L_2.4 range init only, as the shipped scripts run; False: + QDrop recon
    iters: int = 20000  # QDrop's default per layer (the shipped --iters_w 100 never runs: no --use_adaround)
    batch_size: int = 32
    lr_w: float = 1e-3  # Adam default on AdaRound alpha (QDrop)
    lr_a: float = 4e-5  # QDrop --lr for the activation step sizes, cosine decay
    adaround_reg: float = 0.01  # shipped script --weight 0.01
    qdrop_prob: float = 0.5  # --prob 0.5
    input_prob: float = 0.5  # --input_prob 0.5
    quantize_attention: bool = False  # the official UNet's attention matmuls stay FP
    split_shortcut: bool = False  # QDrop has no shortcut splitting
    granularity: str = "layer"  # QDrop's recon_model finds no special blocks in this UNet: layer by layer

    def validate(self) -> None:
        super().validate()
        _ndtc_params(2, self.ndtc, self.ndtc_mean, self.ndtc_std)
        if self.granularity not in ("layer", "block"):
            raise UsageError(f"granularity must be 'layer' or 'block', got {self.granularity!r}")
        if self.iters < 1 or self.batch_size < 1:
            raise UsageError(f"iters and batch_size must be >= 1, got {self.iters} and {self.batch_size}")

    def select(self, model, trajectories, seed: int):
        self.check_trajectories(trajectories, self.n_samples)
        S, N = trajectories.xs.shape[:2]
        steps = ndtc_steps(self.n_samples, S, self.ndtc, self.ndtc_mean, self.ndtc_std, seed=seed)
        step_of_sample = torch.cat([steps, torch.full((N - self.n_samples,), -1, dtype=torch.long)])
        valid = steps[steps >= 0]
        if len(valid) == 0:
            raise UsageError(f"every NDTC draw fell outside the {S} sampling steps; raise n_samples or set ndtc_mean")
        allocation = torch.bincount(valid, minlength=S).tolist()
        return trajectories.select(step_of_sample), allocation, {"ndtc_dropped": int((steps < 0).sum())}

    def stages(self, bits: str, seed: int) -> list:
        from eda.recon import ReconConfig
        from eda.registry import Stage

        if self.official_scripts:
            return []
        cfg = ReconConfig(iters=self.budget_iters(self.iters), batch_size=self.batch_size, lr_w=self.lr_w, lr_a=self.lr_a,
                          loss="mse", qdrop_prob=self.qdrop_prob, input_prob=self.input_prob,
                          adaround_reg=self.adaround_reg, b_range=(20, 2), warmup=0.2, learn_weights=True,
                          learn_act_delta=True, asym=True, seed=seed, granularity=self.granularity,
                          lr_schedule="cosine_acts", budget=self.budget)
        return [Stage("qdrop", cfg, weights=True, acts=True)]
