"""EDA-DM (arXiv 2401.04585) as released: TDAC calibration + FBR block reconstruction, and its two ablations.

Defaults are the official CIFAR-10 script (`scripts/for_cifar.sh`, `sample_diffusion_ddim.py` kwargs); the digits model uses them too, and `model.defaults` carries other settings (LSUN: r 0.3, ...):
- TDAC: N = 1024 trajectories, one sample each; features = input of the mid attention; lambda 1.2, r 3.0.
- FBR: gamma 0.8 (`--add_loss`), 5000 iterations per block/layer, batch 32, QDrop p = 0.5 on activations and on the
  block input (`prob`, `input_prob`), AdaRound *without* its regulariser (`loss_mode='none'`), LSQ activation step
  sizes, two Adams (lr_w on alpha, lr_a on the deltas) with cosine decay to 0, `asym=True`.
- lr_w / lr_a per bit width: W8A8 5e-2 / 1e-3, W4A8 5e-1 / 5e-4 (CIFAR). Other widths (our choice, not published):
  the row of the nearer official weight width, i.e. W <= 4 -> the W4A8 pair, W >= 5 -> the W8A8 pair, whatever the
  activation width (both official rows are A8).
- Policy: symmetric per-channel weights / per-tensor activations, L_2.4 range search, first and last weight layers
  8 bit, network-output conv input unquantized, shortcut split on, attention matmuls quantized (softmax 8 bit).

Ablations (same knobs, one change each):
- `eda-dm:tdac-only`: TDAC calibration + plain block reconstruction (`loss="mse"`: block-output MSE only; QDrop,
  AdaRound and LSQ settings unchanged, so only FBR's layer term is removed).
- `eda-dm:fbr-only`: uniform calibration (the same N trajectories, one sample each, spread evenly over the steps)
  + FBR.

On radius degeneracy: r = 3.0 is an absolute threshold on mean squared feature differences, tuned to the CIFAR
model's feature scale. On another model it can make every pair of steps "dense" or none; TDAC then allocates by
diversity alone (eda.tdac). We keep the published default and report `tdac.dense_fraction` in the info so the
regime is visible; set `radius` explicitly to study it. Measured on digits-ddpm (256 trajectories, DDIM 100 quad):
pairwise step MSEs span 2e-13..5.7 (median 0.91), so r = 3.0 is *not* degenerate there (81% of step pairs dense,
D from 23 to 99); n_t ranges 8..14 per step at N = 1024, with V highest at x_T and D peaking near step 20.
"""

from __future__ import annotations

from dataclasses import dataclass

from eda.errors import UsageError
from eda.fbr import FBR_GAMMA
from eda.registry import PTQMethod, Stage, register_method

# Official CIFAR-10 learning rates by bit width (`scripts/for_cifar.sh`): (lr_w, lr_a).
LR_TABLE = {"W8A8": (5e-2, 1e-3), "W4A8": (5e-1, 5e-4)}


def lr_for_bits(bits: str) -> tuple[float, float]:
    """The official pair for W8A8 / W4A8, else the row of the nearer weight width (W <= 4 -> W4A8)."""
    from eda.policy import parse_bits

    w, a = parse_bits(bits)
    key = f"W{w}A{a}"
    if key in LR_TABLE:
        return LR_TABLE[key]
    return LR_TABLE["W4A8"] if w <= 4 else LR_TABLE["W8A8"]


@register_method("eda-dm:fbr-only", calibration="uniform")
@register_method("eda-dm:tdac-only", loss="mse")
@register_method("eda-dm")
@dataclass(frozen=True)
class EDADM(PTQMethod):
    """TDAC calibration + FBR reconstruction (the official CIFAR-10 settings)."""

    calibration: str = "tdac"  # "tdac" or "uniform" (the fbr-only ablation)
    loss: str = "fbr"  # "fbr" or "mse" (block output only; the tdac-only ablation)
    lam: float = 1.2  # TDAC lambda (--lamda)
    radius: float = 3.0  # TDAC density radius r (dense_r)
    tdac_batch: int | None = None  # trajectories whose features TDAC uses; None = all n_samples (CIFAR: 1024)
    gamma: float = FBR_GAMMA  # --add_loss
    iters: int = 5000
    batch_size: int = 32
    lr_w: float | None = None  # None = LR_TABLE for the bit width
    lr_a: float | None = None
    qdrop_prob: float = 0.5
    input_prob: float = 0.5

    def validate(self) -> None:
        super().validate()
        if self.calibration not in ("tdac", "uniform"):
            raise UsageError(f"calibration must be 'tdac' or 'uniform', got {self.calibration!r}")
        if self.loss not in ("fbr", "mse"):
            raise UsageError(f"loss must be 'fbr' or 'mse', got {self.loss!r}")
        if self.iters < 1 or self.batch_size < 1:
            raise UsageError(f"iters and batch_size must be >= 1, got {self.iters} and {self.batch_size}")
        if self.radius < 0 or self.gamma < 0:
            raise UsageError(f"radius and gamma must be >= 0, got {self.radius} and {self.gamma}")
        if self.tdac_batch is not None and self.tdac_batch < 1:
            raise UsageError(f"tdac_batch must be >= 1 or none, got {self.tdac_batch}")

    def resolve_bits(self, bits: str) -> EDADM:
        from dataclasses import replace

        lr_w, lr_a = lr_for_bits(bits)
        return replace(self, lr_w=lr_w if self.lr_w is None else self.lr_w,
                       lr_a=lr_a if self.lr_a is None else self.lr_a)

    def feature_modules(self, model) -> tuple[str, ...]:
        if self.calibration != "tdac":
            return ()
        from eda.trajectories import mid_attention_name

        return (mid_attention_name(model.unet),)

    def select(self, model, trajectories, seed: int):
        import torch

        from eda.tdac import assign_steps, counts_from_weights, tdac_scores

        self.check_trajectories(trajectories, self.n_samples)
        S, N = trajectories.xs.shape[:2]
        if self.calibration == "uniform":
            counts = counts_from_weights(torch.ones(S), self.n_samples)
            return trajectories.select(assign_steps(counts, N, seed=seed)), counts.tolist(), {}
        (name,) = self.feature_modules(model)
        if name not in (trajectories.features or {}):
            raise UsageError(f"the trajectories carry no features of {name!r}; record them with "
                             f"feature_modules={self.feature_modules(model)} (see calibration_request)")
        feats = trajectories.features[name][:, : min(self.tdac_batch or self.n_samples, N)]
        scores = tdac_scores(feats, self.radius, self.lam)
        counts = counts_from_weights(scores["weight"], self.n_samples)
        tdac = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in scores.items()}
        return trajectories.select(assign_steps(counts, N, seed=seed)), counts.tolist(), {"tdac": tdac}

    def stages(self, bits: str, seed: int) -> list[Stage]:
        from eda.recon import ReconConfig

        cfg = ReconConfig(iters=self.budget_iters(self.iters), batch_size=self.batch_size, lr_w=self.lr_w, lr_a=self.lr_a,
                          loss=self.loss, gamma=self.gamma if self.loss == "fbr" else 0.0,
                          qdrop_prob=self.qdrop_prob, input_prob=self.input_prob, adaround_reg=None,
                          learn_weights=True, learn_act_delta=True, asym=True, seed=seed, budget=self.budget)
        return [Stage(self.loss, cfg, weights=True, acts=True)]
