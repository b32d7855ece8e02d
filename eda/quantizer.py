"""Uniform affine fake-quantization with straight-through rounding (BRECQ/QDrop `UniformAffineQuantizer` lineage).

Every quantizer works in unsigned integer space: q = clamp(round(x / delta) + z, 0, 2^b - 1), x_hat = (q - z) delta.
"Symmetric" means the clipping range is [-thres, thres], or [0, thres] / [-thres, 0] for one-sided tensors, which is
how EDA-DM's released code builds its symmetric quantizer (`qdiff/quant_layer.py::UniformAffineQuantizer`,
`get_x_min_x_max`): one-sidedness ("pos" if min >= 0, "neg" if max <= 0) is decided once, on the whole tensor of the
first call (all channels of a weight; the first calibration batch of an activation), and kept. One set of
parameters per quantizer, shared by all time steps (EDA-DM's README stresses it).

Range estimators (`init`):
- "lp": symmetric: EDA-DM/QDrop `perform_1D_search` over 100 clipping ranges thres = absmax * i / 100, i = 1..100,
  minimising the mean |x - Q(x)|^2.4 (LAPQ), first minimum; asymmetric: Q-Diffusion's 'mse' branch, 80 shrink steps
  [min (1 - 0.01 i), max (1 - 0.01 i)], i = 0..79, same error. Per-channel weights search each output channel
  independently. For activations the error is evaluated on at most `LP_MAX_ELEMS` evenly strided elements (the
  extremes that set the candidates come from the full tensor), which keeps the search affordable on CPU; this
  subsampling is ours (docs/fidelity.md).
- "minmax": the full range [min, max] (zero included), or [-absmax, absmax] when symmetric: our round-to-nearest.
- "qdiff-max": Q-Diffusion's 'max' initialisation exactly (`init_quantization_scale`): symmetric (`--a_sym`)
  delta = absmax / (2^(b-1) - 1) on the signed codes [-2^(b-1), 2^(b-1) - 1]; asymmetric
  delta = (max - min) / (2^b - 1) of the raw range and z = round(-min(x_min, 0) / delta), per output channel for
  weights.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from eda.policy import check_bits

LP_P = 2.4
LP_MAX_ELEMS = 1 << 14
EMA_MOMENTUM = 0.9  # EDA-DM: running = 0.9 * running + 0.1 * new over calibration batches (`UniformAffineQuantizer.update_quantize_range`)
# Sampling and evaluation run without autograd; there fake-quantization runs in place, in half the passes over the
# tensor (bit-identical results). Off = the autograd formula everywhere.
FUSED_INFERENCE = True
# Reconstruction (with autograd): per-tensor activation quantizers use `_LSQFakeQuant`, the same values and gradients
# in fewer passes. Off = autograd of the formula.
FUSED_TRAINING = True
# Opt-in (EDA_BENCH_COMPILE_FAKEQUANT=1): the inference path as one torch.compile'd elementwise kernel, a single pass
# over the tensor (C++ on CPU, Triton on GPU). Costs a one-off compilation (~35 s on a 2-core CPU) per process, so it
# pays off for long sampling runs; `python -m bench.perf --only sampling` measures it side by side.
COMPILED_INFERENCE = os.environ.get("EDA_BENCH_COMPILE_FAKEQUANT", "") == "1"
_COMPILED = None


def _fq_kernel(x: torch.Tensor, delta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / delta), lo, hi) * delta


def _compiled_kernel():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_fq_kernel, dynamic=True)
    return _COMPILED


class _LSQFakeQuant(torch.autograd.Function):
    """The training path of a per-tensor quantizer: clamp(round(x / d), lo, hi) * d with the straight-through
    estimator on round, LSQ's gradient for the step size d (zero point fixed, no gradient scaling) and QDrop's
    per-element FP keep mask, in fewer and cheaper tensor passes than autograd of the formula (masks as float
    multipliers: torch.where and masked_fill are several times slower than a multiply on CPU). Same values; gradients
    equal up to float summation order (tests/test_quantizer.py). With s = x / d and c = clamp(round(s), lo, hi):
    dx = g where lo < c < hi or the FP value is kept, else 0; dd = sum g * (c - s) strictly inside, g * c at or
    beyond the bounds, 0 where kept: what autograd of `(clamp(round_ste(x / d) + z, 0, 2^b - 1) - z) * d` gives
    (torch.clamp passes no gradient at its bounds).
    """

    @staticmethod
    def forward(ctx, x, delta, lo: float, hi: float, keep):
        d = delta.detach().clamp_min(1e-8)
        s = x / d
        c = torch.round(s).clamp_(lo, hi)
        y = c * d
        if keep is not None:
            y = torch.lerp(y, x, keep)  # keep is 1.0 where the FP value is kept, else 0.0
        ctx.save_for_backward(s, c, keep, delta)
        ctx.bounds = (lo, hi)
        return y

    @staticmethod
    def backward(ctx, g):
        s, c, keep, delta = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = c.sub(lo).mul_(c.sub(hi).neg_()).gt_(0.0)  # 1.0 strictly inside (lo, hi), else 0.0
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = g * (inside if keep is None else torch.maximum(inside, keep))
        if ctx.needs_input_grad[1]:
            per = c.sub_(s.mul_(inside))  # c - s inside, c outside (the saved tensors are not needed again)
            if keep is not None:
                per.mul_(1.0 - keep)
            gd = torch.dot(g.reshape(-1), per.reshape(-1)).reshape(delta.shape)
            if float(delta) <= 1e-8:  # clamp_min(1e-8) passes no gradient below the floor
                gd = torch.zeros_like(delta)
        return gx, gd, None, None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float = 2.0, reduction: str = "none",
            dim: int = 1) -> torch.Tensor:
    """The papers' `lp_loss` (`qdiff/quant_layer.py::lp_loss`): |pred - tgt|^p summed over the channel dim (`dim`,
    1 in the official layouts), averaged over the rest ('none', as used for reconstruction); 'all' averages over
    every element."""
    err = (pred - tgt).abs().pow(p)
    if reduction == "all" or err.dim() < 2:
        return err.mean()
    return err.sum(dim).mean()


def _qdq(x, lo, hi, n_levels):
    delta = ((hi - lo) / (n_levels - 1)).clamp_min(1e-8)
    zp = (-lo / delta).round()
    return (torch.clamp((x / delta).round() + zp, 0, n_levels - 1) - zp) * delta


def one_side(x: torch.Tensor) -> str:
    """'pos' if every element is >= 0, 'neg' if every element is <= 0, else 'no' (the official `one_side_dist`)."""
    return "pos" if float(x.min()) >= 0.0 else "neg" if float(x.max()) <= 0.0 else "no"


def search_range(x2d: torch.Tensor, n_bits: int, symmetric: bool, method: str, unsigned: bool = False,
                 p: float = LP_P, max_elems: int | None = None, side: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range (lo, hi) per row of `x2d` ([C, n]) by the estimator `method` (module docstring). `side` is the
    one-sidedness to use ('pos'/'neg'/'no'; None = decide on this tensor); `unsigned` forces 'pos'."""
    x2d = x2d.detach().float()
    xmin, xmax = x2d.min(1).values, x2d.max(1).values
    if method == "qdiff-max":
        return _qdiff_max(xmin, xmax, n_bits, symmetric)
    side = "pos" if unsigned else (side or one_side(x2d))
    zeros = torch.zeros_like(xmin)
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        lo_full = zeros if side == "pos" else -absmax
        hi_full = zeros if side == "neg" else absmax
    else:
        lo_full, hi_full = xmin.clamp_max(0), xmax.clamp_min(0)
    if method == "minmax":
        return lo_full, hi_full
    if method != "lp":
        raise ValueError(f"unknown range init {method!r}")
    if max_elems is not None and x2d.shape[1] > max_elems:
        x2d = x2d[:, :: -(-x2d.shape[1] // max_elems)]
    n_levels = 2**n_bits
    # Candidate ranges [K, C] computed with the official float32 expressions: symmetric thres = xrange / 100 * i
    # (`perform_1D_search`), asymmetric x_{min,max} * (1.0 - i * 0.01) (Q-Diffusion's 'mse').
    if symmetric:
        steps = torch.arange(1, 101, dtype=torch.float32)[:, None]
        thres = torch.maximum(xmin.abs(), xmax.abs())[None] / 100 * steps
        cand_lo = torch.zeros_like(thres) if side == "pos" else -thres
        cand_hi = torch.zeros_like(thres) if side == "neg" else thres
    else:
        shrink = torch.tensor([1.0 - i * 0.01 for i in range(80)], dtype=torch.float32)[:, None]
        cand_lo, cand_hi = xmin[None] * shrink, xmax[None] * shrink  # the raw range, zero not forced in
    # Evaluated in chunks of [K, C, n] to keep the loop short (same result as one candidate at a time).
    chunk = max(1, (1 << 22) // max(x2d.numel(), 1))
    errs = []
    for lo, hi in zip(cand_lo.split(chunk), cand_hi.split(chunk)):
        xq = _qdq(x2d[None], lo[..., None], hi[..., None], n_levels)
        errs.append((x2d[None] - xq).abs().pow(p).mean(-1))
    best = torch.cat(errs).argmin(0)  # first minimum, as the official strict '<' scan / argmin picks
    cols = torch.arange(len(best))
    return cand_lo[best, cols], cand_hi[best, cols]


def _qdiff_max(xmin: torch.Tensor, xmax: torch.Tensor, n_bits: int, symmetric: bool):
    """(lo, hi) whose grid (delta = (hi - lo) / (2^b - 1), z = round(-lo / delta)) is Q-Diffusion's 'max' init."""
    n_levels = 2**n_bits
    if symmetric:
        half = 2 ** (n_bits - 1)
        delta = (torch.maximum(xmin.clamp_max(0).abs(), xmax.clamp_min(0)) / (half - 1)).clamp_min(1e-8)
        return -half * delta, (half - 1) * delta  # z = 2^(b-1): signed codes [-2^(b-1), 2^(b-1) - 1]
    delta = ((xmax - xmin) / (n_levels - 1)).clamp_min(1e-8)
    zp = (-xmin.clamp_max(0) / delta).round()
    return -zp * delta, (n_levels - 1 - zp) * delta


class UniformQuantizer(nn.Module):
    """Fake-quantizer: per-channel (dim 0, weights) or per-tensor (activations); sym/asym; unsigned (softmax).

    States: `enabled` (off = identity), `calibrating` (observe the input, update the range by EMA), `qdrop_prob`
    with `training_qdrop` (QDrop: each element keeps its FP value with that probability). `learn_delta()` turns the
    step size into a trainable parameter (LSQ-style, zero point fixed, no gradient scaling, as `block_reconstruction`'s act_quant branch).
    """

    def __init__(self, n_bits: int, symmetric: bool = True, channel_wise: bool = False, unsigned: bool = False,
                 init: str = "lp", p: float = LP_P):
        super().__init__()
        self.n_bits = check_bits(n_bits, "quantizer bits")
        self.symmetric, self.channel_wise, self.unsigned, self.init, self.p = symmetric, channel_wise, unsigned, init, p
        self.delta = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("_range", torch.zeros(2, 0))  # running (lo, hi) while calibrating
        self.initialized = False
        self.side: str | None = None  # one-sidedness, decided on the first tensor seen and kept (module docstring)
        self.enabled = True
        self.calibrating = False
        self.qdrop_prob = 0.0
        self.training_qdrop = False

    @property
    def n_levels(self) -> int:
        return 2**self.n_bits

    def set_bits(self, n_bits: int):
        self.n_bits = check_bits(n_bits, "quantizer bits")

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) if self.channel_wise else x.reshape(1, -1)

    def _shape(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (x.dim() - 1))) if self.channel_wise else v.reshape(())

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor, like: torch.Tensor):
        delta = ((hi - lo) / (self.n_levels - 1)).clamp_min(1e-8)
        zp = (-lo / delta).round()
        with torch.no_grad():
            self.delta.data = self._shape(like, delta).to(like.device)
            self.zero_point = self._shape(like, zp).to(like.device)
        self.initialized = True

    def _search(self, x: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.side is None:
            self.side = one_side(x)
        return search_range(self._rows(x), self.n_bits, self.symmetric, method, self.unsigned, self.p,
                            None if self.channel_wise else LP_MAX_ELEMS, side=self.side)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str | None = None):
        """Set the range from one tensor (weights: the whole weight; activations: one batch)."""
        lo, hi = self._search(x, method or self.init)
        self.set_range(lo, hi, x)

    @torch.no_grad()
    def observe(self, x: torch.Tensor):
        """One calibration batch: range by the init method, EMA 0.9/0.1 across batches (EDA-DM)."""
        lo, hi = self._search(x, self.init)
        new = torch.stack([lo, hi]).to(self._range.device)
        self._range = new if self._range.numel() == 0 else EMA_MOMENTUM * self._range + (1 - EMA_MOMENTUM) * new
        self.set_range(self._range[0], self._range[1], x)

    def learn_delta(self, on: bool = True):
        self.delta.requires_grad_(on)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, 2^b - 1] (no gradient), as stored by the checkpoint."""
        delta = self.delta.detach().clamp_min(1e-8)
        return torch.clamp((x / delta).round() + self.zero_point, 0, self.n_levels - 1)

    def fake_quant(self, x: torch.Tensor, keep_fp: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat; where `keep_fp` (a 0/1 float mask) is 1 the FP value is kept instead (QDrop)."""
        if FUSED_INFERENCE and not torch.is_grad_enabled() and x.dtype == torch.float32:
            xq = self._fake_quant_fused(x)
        elif FUSED_TRAINING and self.zero_point.dim() == 0 and self.delta.dim() == 0 and x.dtype == torch.float32:
            z = float(self.zero_point)
            return _LSQFakeQuant.apply(x, self.delta, -z, (self.n_levels - 1) - z, keep_fp)
        else:
            delta = self.delta.clamp_min(1e-8)
            q = torch.clamp(round_ste(x / delta) + self.zero_point, 0, self.n_levels - 1)
            xq = (q - self.zero_point) * delta
        return xq if keep_fp is None else torch.where(keep_fp.bool(), x, xq)

    def _fake_quant_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Inference path (no autograd): four in-place passes instead of eight allocating ones.

        clamp(round(x / d) + z, 0, 2^b - 1) - z == clamp(round(x / d), -z, 2^b - 1 - z) exactly (integers in float),
        so this is bit-identical to the training formula. (ATen's fused fake_quantize_per_*_affine kernels were
        slower on CPU: they always compute the backward mask, and multiply by 1/d, which moves rare ties.)
        """
        delta = self.delta.detach().clamp_min(1e-8)
        zp = self.zero_point
        if COMPILED_INFERENCE:
            return _compiled_kernel()(x, delta, -zp, (self.n_levels - 1) - zp)
        y = torch.div(x, delta)
        y.round_()
        if zp.dim() == 0 and zp.device.type == "cpu":
            z = float(zp)  # scalar bounds: ATen's tensor-bound clamp is ~4x slower on CPU
            y.clamp_(-z, (self.n_levels - 1) - z)
        else:
            y.clamp_(-zp, (self.n_levels - 1) - zp)
        return y.mul_(delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            self.observe(x)
        elif not self.initialized:
            self.init_from(x)
        keep_fp = None
        if self.training_qdrop and self.qdrop_prob > 0:
            # QDrop: with probability p an element keeps its full-precision value (`UniformAffineQuantizer(prob=0.5)`).
            keep_fp = torch.rand_like(x).lt_(self.qdrop_prob)  # 1.0 where the FP value is kept
        return self.fake_quant(x, keep_fp)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.channel_wise else "per-tensor"
        sym = "unsigned" if self.unsigned else ("sym" if self.symmetric else "asym")
        return f"bits={self.n_bits}, {kind}, {sym}, init={self.init}, enabled={self.enabled}"
