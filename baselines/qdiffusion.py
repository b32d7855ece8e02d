"""Q-Diffusion (Li et al., ICCV 2023), CIFAR-10 DDIM settings of the official README and
`scripts/sample_diffusion_ddim.py`.

- Calibration: time step-aware uniform sampling: the steps `range(0, S, S // cali_st)` of the sampling trajectory
  (index 0 = x_T, as DDIM's saved intermediates) and the first `cali_n` trajectories at each, 20 x 256 = 5120
  samples by default (`qdiff/utils.py::get_train_samples`). Unlike TDAC/NDTC a trajectory contributes at several
  steps.
- Quantizers: per-channel asymmetric weights and symmetric (`--a_sym`) per-tensor activations, both initialised by
  'max' (`init_quantization_scale`, our "qdiff-max": symmetric codes [-2^(b-1), 2^(b-1) - 1] with
  delta = absmax / (2^(b-1) - 1)); the softmax output quantizer takes the activation settings (`sm_abit` 8), so on
  the CIFAR attention block it is the same signed grid.
- Weights: BRECQ block reconstruction with AdaRound, activations off: regulariser 0.01 on `weight_quantizer`,
  b 20 -> 2, warm-up 0.2, Adam lr 1e-3 (default) on alpha only, no scheduler, 20000 iterations per block/layer, batch
  32, `asym=True` (inputs from the weight-quantized upstream model).
- Then activation ranges from the first quantized forward of 64 random calibration samples (no `--running_stat` in
  the CIFAR command), after weight reconstruction as the script orders it.
- Activations: the step sizes alone (LSQ, zero point fixed) with weights and activations on: Adam lr 4e-4, cosine to
  0, L_p loss with p = 2.4, 5000 iterations, batch 32, `asym=False`: FP block inputs and FP targets
  (`GetLayerInpOut` runs the network in FP when asym is off).
- Policy: shortcut split on (`--split`), every layer at the same bits and every layer input quantized, the output
  conv's included (no first/last 8-bit exception, no `disable_network_output_quantization`).
The LDM and SD scripts differ (L_p 'mse' ranges, no `--a_sym` on Church and SD, no split on LSUN, softmax 16 bit on
SD, `--running_stat`): bench.models.zoo sets those per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eda.errors import UsageError
from eda.registry import PTQMethod, Stage, register_method


def qdiffusion_steps(n_steps: int, cali_st: int) -> list[int]:
    """The step indices `get_train_samples` takes: range(0, S, S // cali_st) (may give more than cali_st when
    S is not a multiple, as the official code does)."""
    if cali_st < 1 or cali_st > n_steps:
        raise UsageError(f"cali_st must be in 1..{n_steps} (the sampling steps), got {cali_st}")
    return list(range(0, n_steps, n_steps // cali_st))


@register_method("qdiffusion")
@dataclass(frozen=True)
class QDiffusion(PTQMethod):
    """Uniform time-step calibration + BRECQ/AdaRound weight reconstruction + LSQ activation step learning."""

    cali_st: int = 20
    cali_n: int = 256
    iters: int = 20000  # weight reconstruction per block/layer (--cali_iters)
    iters_a: int = 5000  # activation step learning (--cali_iters_a)
    batch_size: int = 32  # --cali_batch_size
    lr_w: float = 1e-3  # Adam default on AdaRound alpha
    lr_a: float = 4e-4  # --cali_lr
    p: float = 2.4  # --cali_p, the activation stage's L_p loss
    adaround_reg: float = 0.01
    warmup: float = 0.2
    w_symmetric: bool = False
    a_symmetric: bool = True
    first_last_8bit: str = "none"
    quantize_output_input: bool = True
    w_init: str = "qdiff-max"  # the DDIM script's scale_method 'max'
    a_init: str = "qdiff-max"
    # activation ranges from the first quantized forward on 64 random calibration samples (DDIM script, no
    # --running_stat in the CIFAR command)
    init_batch: int = 64
    init_samples: int | None = 64

    def validate(self) -> None:
        super().validate()
        for k in ("cali_st", "cali_n", "iters", "iters_a", "batch_size"):
            if getattr(self, k) < 1:
                raise UsageError(f"{k} must be >= 1, got {getattr(self, k)}")

    def n_trajectories(self) -> int:
        return self.cali_n

    def select(self, model, trajectories, seed: int):
        self.check_trajectories(trajectories, self.cali_n)
        S = trajectories.xs.shape[0]
        steps = qdiffusion_steps(S, self.cali_st)
        st = torch.tensor(steps, dtype=torch.long).repeat_interleave(self.cali_n)
        samples = torch.arange(self.cali_n).repeat(len(steps))
        allocation = [self.cali_n if s in set(steps) else 0 for s in range(S)]
        return trajectories.select_pairs(st, samples), allocation, {}

    def stages(self, bits: str, seed: int) -> list[Stage]:
        from eda.recon import ReconConfig

        w = ReconConfig(iters=self.budget_iters(self.iters), batch_size=self.batch_size, lr_w=self.lr_w, lr_a=0.0,
                        loss="mse", qdrop_prob=0.0, input_prob=1.0, adaround_reg=self.adaround_reg, b_range=(20, 2),
                        warmup=self.warmup, learn_weights=True, learn_act_delta=False, asym=True, seed=seed,
                        lr_schedule="constant", budget=self.budget)
        a = ReconConfig(iters=self.budget_iters(self.iters_a), batch_size=self.batch_size, lr_w=0.0, lr_a=self.lr_a,
                        loss="lp", p=self.p, qdrop_prob=0.0, input_prob=1.0, adaround_reg=None,
                        learn_weights=False, learn_act_delta=True, asym=False, seed=seed, budget=self.budget)
        return [Stage("weights", w, weights=True, acts=False),
                Stage("activations", a, weights=True, acts=True, init_acts=True)]
