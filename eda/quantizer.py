"""Uniform affine fake-quantization with straight-through rounding (BRECQ/QDrop `UniformAffineQuantizer` lineage).

Every quantizer works in unsigned integer space: q = clamp(round(x / delta) + z, 0, 2^b - 1), x_hat = (q - z) delta.
"Symmetric" means the clipping range is [-thres, thres], or [0, thres] for one-sided tensors (observed minimum
>= 0, e.g. softmax outputs), which is how EDA-DM's released code builds its symmetric quantizer (eda-dm.md §2 "Quantizers"). One set of parameters per quantizer,
shared by all time steps (eda-dm.md §2; the README of EDA-DM stresses it).

Range search ("lp"), documented variant:
- symmetric: EDA-DM/QDrop 1-D search over 100 clipping ranges thres = absmax * i / 100, i = 1..100, minimising
  the L_p error with p = 2.4 (LAPQ); one-sided tensors use [0, thres] (eda-dm.md §2);
- asymmetric: Q-Diffusion's 80 shrink steps [min (1 - 0.01 i), max (1 - 0.01 i)], i = 0..79, same L_p error
  (baselines.md §1.3).
Per-channel weights search each output channel independently. For activations the error is evaluated on at most
`LP_MAX_ELEMS` evenly strided elements (the extremes that set the candidates come from the full tensor), which
keeps the search affordable on CPU; this subsampling is ours.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from eda.policy import check_bits

LP_P = 2.4
LP_MAX_ELEMS = 1 << 14
EMA_MOMENTUM = 0.9  # EDA-DM: running = 0.9 * running + 0.1 * new over calibration batches (eda-dm.md §2)
# Sampling and evaluation run without autograd; there fake-quantization runs in place, in half the passes over the
# tensor (bit-identical results). Off = the autograd formula everywhere.
FUSED_INFERENCE = True
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


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def lp_loss(pred: torch.Tensor, tgt: torch.Tensor, p: float = 2.0, reduction: str = "none") -> torch.Tensor:
    """The papers' `lp_loss`: |pred - tgt|^p summed over the channel dim (dim 1), averaged over the rest
    ('none', as used for reconstruction); 'all' averages over every element."""
    err = (pred - tgt).abs().pow(p)
    if reduction == "all" or err.dim() < 2:
        return err.mean()
    return err.sum(1).mean()


def _qdq(x, lo, hi, n_levels):
    delta = ((hi - lo) / (n_levels - 1)).clamp_min(1e-8)
    zp = (-lo / delta).round()
    return (torch.clamp((x / delta).round() + zp, 0, n_levels - 1) - zp) * delta


def search_range(x2d: torch.Tensor, n_bits: int, symmetric: bool, method: str, unsigned: bool = False,
                 p: float = LP_P, max_elems: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping range (lo, hi) per row of `x2d` ([C, n]) by 'minmax' or the 'lp' search described above."""
    x2d = x2d.detach().float()
    xmin, xmax = x2d.min(1).values, x2d.max(1).values
    one_sided = (xmin >= 0) | torch.tensor(unsigned)
    xmin = torch.where(one_sided, torch.zeros_like(xmin), xmin)
    if symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        lo_full = torch.where(one_sided, torch.zeros_like(absmax), -absmax)
        hi_full = absmax
    else:
        lo_full, hi_full = xmin.clamp_max(0), xmax.clamp_min(0)
    if method == "minmax":
        return lo_full, hi_full
    if method != "lp":
        raise ValueError(f"unknown range init {method!r}")
    if max_elems is not None and x2d.shape[1] > max_elems:
        x2d = x2d[:, :: -(-x2d.shape[1] // max_elems)]
    n_levels = 2**n_bits
    fracs = torch.tensor([i / 100 for i in range(1, 101)] if symmetric else [1 - 0.01 * i for i in range(80)])
    # Candidates are evaluated in chunks of [K, C, n] to keep the loop short (same result as one at a time).
    chunk = max(1, (1 << 22) // max(x2d.numel(), 1))
    errs = []
    for f in fracs.split(chunk):
        lo, hi = lo_full[None] * f[:, None], hi_full[None] * f[:, None]  # [K, C]
        xq = _qdq(x2d[None], lo[..., None], hi[..., None], n_levels)
        errs.append((x2d[None] - xq).abs().pow(p).mean(-1))
    best = torch.cat(errs).argmin(0)  # first minimum, as a strict '<' scan would pick
    f_best = fracs[best]
    best_lo, best_hi = lo_full * f_best, hi_full * f_best
    return best_lo, best_hi


class UniformQuantizer(nn.Module):
    """Fake-quantizer: per-channel (dim 0, weights) or per-tensor (activations); sym/asym; unsigned (softmax).

    States: `enabled` (off = identity), `calibrating` (observe the input, update the range by EMA), `qdrop_prob`
    with `training_qdrop` (QDrop: each element keeps its FP value with that probability). `learn_delta()` turns the
    step size into a trainable parameter (LSQ-style, zero point fixed, no gradient scaling; baselines.md §1.5).
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

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str | None = None):
        """Set the range from one tensor (weights: the whole weight; activations: one batch)."""
        lo, hi = search_range(self._rows(x), self.n_bits, self.symmetric, method or self.init, self.unsigned,
                              self.p, None if self.channel_wise else LP_MAX_ELEMS)
        self.set_range(lo, hi, x)

    @torch.no_grad()
    def observe(self, x: torch.Tensor):
        """One calibration batch: range by the init method, EMA 0.9/0.1 across batches (EDA-DM)."""
        lo, hi = search_range(self._rows(x), self.n_bits, self.symmetric, self.init, self.unsigned, self.p,
                              None if self.channel_wise else LP_MAX_ELEMS)
        new = torch.stack([lo, hi]).to(self._range.device)
        self._range = new if self._range.numel() == 0 else EMA_MOMENTUM * self._range + (1 - EMA_MOMENTUM) * new
        self.set_range(self._range[0], self._range[1], x)

    def learn_delta(self, on: bool = True):
        self.delta.requires_grad_(on)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, 2^b - 1] (no gradient), as stored by the checkpoint."""
        delta = self.delta.detach().clamp_min(1e-8)
        return torch.clamp((x / delta).round() + self.zero_point, 0, self.n_levels - 1)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED_INFERENCE and not torch.is_grad_enabled() and x.dtype == torch.float32:
            return self._fake_quant_fused(x)
        delta = self.delta.clamp_min(1e-8)
        q = torch.clamp(round_ste(x / delta) + self.zero_point, 0, self.n_levels - 1)
        return (q - self.zero_point) * delta

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
        xq = self.fake_quant(x)
        if self.training_qdrop and self.qdrop_prob > 0:
            # QDrop: with probability p an element keeps its full-precision value (eda-dm.md §2, prob=0.5).
            xq = torch.where(torch.rand_like(x) < self.qdrop_prob, x, xq)
        return xq

    def extra_repr(self) -> str:
        kind = "per-channel" if self.channel_wise else "per-tensor"
        sym = "unsigned" if self.unsigned else ("sym" if self.symmetric else "asym")
        return f"bits={self.n_bits}, {kind}, {sym}, init={self.init}, enabled={self.enabled}"
