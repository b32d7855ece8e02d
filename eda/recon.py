"""Block-wise and layer-wise reconstruction (BRECQ / Q-Diffusion / EDA-DM engine, eda-dm.md §2).

For each unit in forward order:
1. inputs: the unit's call arguments (args and kwargs such as temb or encoder_hidden_states, captured with
   forward pre-hooks) from the already-quantized upstream model (`asym=True`) and from the FP model;
2. targets: the FP unit's output on the FP input and, for FBR, the outputs of its inner layers. These are computed
   ONCE per calibration set and cached (`cache_targets=True`); the official code recomputes them every iteration
   (three block forwards per iteration); `cache_targets=False` does the same (two forwards: quantized + FP);
3. Adam on the AdaRound alphas (lr_w) and on the activation step sizes (lr_a), each with
   CosineAnnealingLR(T_max=iters, eta_min=0); QDrop: activation quantizers keep FP values with prob `qdrop_prob`,
   and the unit input is the quantized one with prob `input_prob`, else the FP one;
4. rounding is hardened (alpha >= 0) and the deltas frozen.

Loss: "mse" = lp_loss(p=2) on the unit output; "lp" = lp_loss(p); "fbr" = output term + gamma * sum of lp_loss(p=2)
over the unit's inner QuantLayer outputs except the LAST one in registration order (what the official code
excludes, eda-dm.md §2: a ResnetBlock2D's conv_shortcut when it has one, else conv2; an Attention's to_out.0; a
BasicTransformerBlock's ff.net.2 in diffusers' registration order, where the official SD code drops attn2.to_out).
The reconstruction uses the quant state the model is in (weights only, or weights + activations).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.errors import BenchError, UsageError
from eda.adaround import AdaRoundQuantizer, annealed_b
from eda.quantizer import UniformQuantizer, lp_loss
from eda.trajectories import CalibSet
from eda.units import Unit, reconstruction_units, unit_layers
from eda.wrap import QuantAttnProcessor, QuantLayer, get_quant_state, unet_kwargs


@dataclass
class ReconConfig:
    iters: int = 1000  # EDA-DM ImageNet/COCO; CIFAR/LSUN use 5000 (eda-dm.md §2)
    batch_size: int = 32
    lr_w: float = 5e-2  # EDA-DM CIFAR W8A8; the per-setting table is in eda-dm.md §2
    lr_a: float = 1e-3
    loss: str = "mse"  # "mse" | "fbr" | "lp"
    gamma: float = 0.8  # FBR weight of the inner-layer terms (--add_loss; CIFAR 0.8)
    p: float = 2.0  # exponent of the "lp" loss
    qdrop_prob: float = 0.5  # probability that an activation element keeps its FP value while training (QDrop)
    input_prob: float = 0.5  # probability that a unit-input element is the quantized one (else the FP one)
    adaround_reg: float | None = None  # EDA-DM: None (loss_mode='none'); Q-Diffusion/BRECQ: 0.01
    b_range: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    learn_weights: bool = True
    learn_act_delta: bool = True
    asym: bool = True
    seed: int = 0
    cache_targets: bool = True
    # "cosine": CosineAnnealingLR(T_max=iters, eta_min=0) as EDA-DM and Q-Diffusion's activation stage;
    # "constant": no scheduler, as BRECQ / Q-Diffusion's AdaRound weight stage (baselines.md §1.4)
    lr_schedule: str = "cosine"
    granularity: str = "block"  # "block" (resnet/attention/transformer blocks + leftover layers) | "layer"
    only: tuple[str, ...] | None = None  # restrict to these unit names (tests, ablations)
    collect_batch_size: int = 64
    max_loss_ratio: float = 1e4  # loss above ratio x the first iteration's loss counts as divergence
    eval_mse: bool = True  # report each unit's deterministic output MSE before and after

    def __post_init__(self):
        if self.loss not in ("mse", "fbr", "lp"):
            raise UsageError(f"reconstruction loss must be mse, fbr or lp, got {self.loss!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UsageError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.iters < 0 or self.batch_size < 1:
            raise UsageError(f"need iters >= 0 and batch_size >= 1, got {self.iters} and {self.batch_size}")


class _Stop(Exception):
    pass


@dataclass
class _Inputs:
    """A unit's call arguments over the whole calibration set: per-sample tensors concatenated, the rest kept."""

    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    batched: set = field(default_factory=set)  # keys ('a', i) / ('k', name) whose value is per-sample

    def get(self, idx: torch.Tensor | slice, device) -> tuple[list, dict]:
        def pick(key, v):
            return v[idx].to(device) if key in self.batched else v

        return ([pick(("a", i), v) for i, v in enumerate(self.args)],
                {k: pick(("k", k), v) for k, v in self.kwargs.items()})


def _collect_inputs(model: nn.Module, module: nn.Module, calib: CalibSet, bs: int, device, name: str) -> _Inputs:
    """Run `model` on the calibration set and capture `module`'s call arguments (stopping right there)."""
    chunks: list[tuple[tuple, dict, int]] = []

    def pre(mod, args, kwargs):
        chunks.append((args, kwargs, cur[0]))
        raise _Stop

    cur = [0]
    h = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for x, t, cond in calib.batches(bs, device=device):
                cur[0] = len(x)
                try:
                    model(x, t, **unet_kwargs(cond))
                except _Stop:
                    pass
    finally:
        h.remove()
    if not chunks:
        raise BenchError(f"unit {name} was never called in a forward pass of the UNet; cannot reconstruct it")
    out = _Inputs()
    a0, k0, _ = chunks[0]
    for i, v in enumerate(a0):
        if torch.is_tensor(v) and v.dim() > 0 and all(torch.is_tensor(c[0][i]) and len(c[0][i]) == c[2]
                                                      for c in chunks):
            out.batched.add(("a", i))
            v = torch.cat([c[0][i].detach().cpu() for c in chunks])
        out.args.append(v)
    for k, v in k0.items():
        if torch.is_tensor(v) and v.dim() > 0 and all(torch.is_tensor(c[1][k]) and len(c[1][k]) == c[2]
                                                      for c in chunks):
            out.batched.add(("k", k))
            v = torch.cat([c[1][k].detach().cpu() for c in chunks])
        out.kwargs[k] = v
    return out


def _main_key(inp: _Inputs):
    if inp.args and ("a", 0) in inp.batched:
        return ("a", 0)
    for k in ("hidden_states", "input_tensor", "sample", "input"):
        if ("k", k) in inp.batched:
            return ("k", k)
    raise BenchError("could not find the main input tensor (first argument or hidden_states) of a unit")


def _first(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out


class _LayerTap:
    """Forward hooks that record the outputs of the given modules (by name) during one forward."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(lambda mod, a, o, n=n: self.out.__setitem__(n, o))
                        for n, m in modules.items()]

    def remove(self):
        for h in self.handles:
            h.remove()


def _unit_act_quantizers(unit: Unit) -> list[UniformQuantizer]:
    qs = []
    for m in unit.module.modules():
        if isinstance(m, QuantLayer) and m.act_allowed or isinstance(m, QuantAttnProcessor):
            qs += m.act_quantizers()
    return qs


def attach_adaround(layers: dict[str, QuantLayer]) -> list[AdaRoundQuantizer]:
    """Swap each layer's uniform weight quantizer(s) for AdaRound on the same grid; returns the ones still soft
    (learnable). Units reconstructed earlier keep their hardened rounding."""
    ada = []
    for layer in layers.values():
        w = layer.module.weight.detach()
        for name, sl in layer.weight_parts():
            q = getattr(layer, name)
            if isinstance(q, UniformQuantizer):
                q = AdaRoundQuantizer(q, w[:, sl])
                setattr(layer, name, q)
            if isinstance(q, AdaRoundQuantizer) and q.soft_targets:
                ada.append(q)
    return ada


def reconstruct(qmodel: nn.Module, fp_unet: nn.Module, calib: CalibSet, cfg: ReconConfig | None = None,
                progress: bool = True) -> dict:
    """Reconstruct every unit of `qmodel` in forward order against `fp_unet`; returns a report
    {seconds, units: {name: {kind, losses, seconds, mse_before, mse_after}}}."""
    cfg = cfg or ReconConfig()
    device = next(qmodel.parameters()).device
    w_on, a_on = get_quant_state(qmodel)
    units = reconstruction_units(qmodel, granularity=cfg.granularity)
    if cfg.only is not None:
        missing = set(cfg.only) - {u.name for u in units}
        if missing:
            raise UsageError(f"unknown reconstruction unit(s) {sorted(missing)}; expected names from "
                             "eda.units.reconstruction_units")
        units = [u for u in units if u.name in cfg.only]
    fp_modules = dict(fp_unet.named_modules())
    report = {"units": {}, "config": dict(vars(cfg))}
    t0 = time.perf_counter()
    for idx, unit in enumerate(units):
        fp_unit = fp_modules.get(unit.name)
        if fp_unit is None:
            raise BenchError(f"unit {unit.name} has no counterpart in the FP UNet; pass the UNet that was quantized")
        report["units"][unit.name] = _reconstruct_unit(qmodel, fp_unet, unit, fp_unit, calib, cfg, idx, device,
                                                       w_on, a_on, progress)
    report["seconds"] = time.perf_counter() - t0
    return report


def _reconstruct_unit(qmodel, fp_unet, unit: Unit, fp_unit: nn.Module, calib: CalibSet, cfg: ReconConfig, idx: int,
                      device, w_on: bool, a_on: bool, progress: bool) -> dict:
    t_start = time.perf_counter()
    seed = cfg.seed * 100_003 + idx
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layers = unit_layers(unit)
    fp_layers = {n: (fp_unit.get_submodule(n) if n else fp_unit) for n in layers}
    inner = list(layers)[:-1] if cfg.loss == "fbr" else []  # FBR: all inner layers but the last (registration)
    q_act = _unit_act_quantizers(unit) if a_on else []

    q_in = _collect_inputs(qmodel, unit.module, calib, cfg.collect_batch_size, device, unit.name)
    fp_in = _collect_inputs(fp_unet, fp_unit, calib, cfg.collect_batch_size, device, unit.name) \
        if (cfg.asym or not cfg.cache_targets) else q_in
    if not cfg.asym:
        q_in = fp_in
    main = _main_key(q_in)
    M = len(calib)

    def fp_forward(sl):
        """FP unit output (and inner-layer outputs) on the FP inputs of samples `sl`."""
        tap = _LayerTap({n: fp_layers[n] for n in inner})
        try:
            with torch.no_grad():
                args, kwargs = fp_in.get(sl, device)
                out = _first(fp_unit(*args, **kwargs))
        finally:
            tap.remove()
        return out, [tap.out[n] for n in inner]

    cached = None
    if cfg.cache_targets:
        outs, inn = [], []
        for s in range(0, M, cfg.collect_batch_size):
            o, i = fp_forward(slice(s, s + cfg.collect_batch_size))
            outs.append(o.cpu())
            inn.append([v.cpu() for v in i])
        cached = (torch.cat(outs), [torch.cat([b[j] for b in inn]) for j in range(len(inner))])

    def targets(sl):
        if cached is not None:
            return cached[0][sl].to(device), [v[sl].to(device) for v in cached[1]]
        return fp_forward(sl)

    def eval_mse() -> float:
        tot = 0.0
        with torch.no_grad():
            for s in range(0, M, cfg.collect_batch_size):
                sl = slice(s, s + cfg.collect_batch_size)
                args, kwargs = q_in.get(sl, device)
                out = _first(unit.module(*args, **kwargs))
                tot += lp_loss(out, targets(sl)[0]).item() * len(out)
        return tot / M

    res = {"kind": unit.kind, "losses": []}
    if cfg.eval_mse:
        res["mse_before"] = eval_mse()

    # learnable parameters: AdaRound alphas for weights, step sizes for activations
    ada = attach_adaround(layers) if cfg.learn_weights and w_on and cfg.iters > 0 else []
    deltas = []
    if cfg.learn_act_delta and cfg.iters > 0:
        for q in q_act:
            if q.enabled and q.initialized and q.n_bits < 16:  # 16-bit softmax excluded (baselines.md §1.5)
                q.learn_delta(True)
                deltas.append(q.delta)
    opts = []
    if ada:
        opts.append(torch.optim.Adam([q.alpha for q in ada], lr=cfg.lr_w))
    if deltas:
        opts.append(torch.optim.Adam(deltas, lr=cfg.lr_a))
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(cfg.iters, 1), eta_min=0) for o in opts] \
        if cfg.lr_schedule == "cosine" else []
    iters = cfg.iters if opts else 0
    for q in q_act:
        q.qdrop_prob, q.training_qdrop = cfg.qdrop_prob, True

    q_tap_modules = {n: layers[n] for n in inner}
    bar = range(iters)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"recon {unit.name}", unit="it", leave=False)
    first_loss = None
    try:
        for it in bar:
            sel = torch.randint(0, M, (cfg.batch_size,), generator=gen)
            args, kwargs = q_in.get(sel, device)
            if cfg.input_prob < 1.0 and cfg.asym:
                fp_main = fp_in.get(sel, device)
                fpv = fp_main[0][main[1]] if main[0] == "a" else fp_main[1][main[1]]
                qv = args[main[1]] if main[0] == "a" else kwargs[main[1]]
                mixed = torch.where(torch.rand(qv.shape, generator=gen).to(device) < cfg.input_prob, qv, fpv)
                if main[0] == "a":
                    args[main[1]] = mixed
                else:
                    kwargs[main[1]] = mixed
            tgt, tgt_inner = targets(sel)
            tap = _LayerTap(q_tap_modules)
            try:
                out = _first(unit.module(*args, **kwargs))
            finally:
                tap.remove()
            rec = lp_loss(out, tgt, p=cfg.p if cfg.loss == "lp" else 2.0)
            if inner:
                rec = rec + cfg.gamma * sum(lp_loss(tap.out[n], t) for n, t in zip(inner, tgt_inner))
            loss = rec
            b = annealed_b(it, iters, cfg.warmup, cfg.b_range) if cfg.adaround_reg else None
            if b is not None and ada:
                loss = loss + cfg.adaround_reg * sum(q.reg_loss(b) for q in ada)
            val = rec.item()
            if first_loss is None:
                first_loss = val
            if not math.isfinite(loss.item()) or val > cfg.max_loss_ratio * max(first_loss, 1e-12):
                raise BenchError(f"reconstruction of unit {unit.name} ({unit.kind}) diverged at iteration {it} "
                                 f"(loss {val:.4g}); lower lr_w / lr_a or check the calibration data for NaN/inf")
            res["losses"].append(val)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            for s in scheds:
                s.step()
    finally:
        for q in ada:
            q.harden()  # hard rounding after the unit (alpha >= 0)
        for q in q_act:
            q.learn_delta(False)
            q.training_qdrop = False
    if cfg.eval_mse:
        res["mse_after"] = eval_mse()
        if not math.isfinite(res["mse_after"]):
            raise BenchError(f"reconstruction of unit {unit.name} ({unit.kind}) produced non-finite outputs; "
                             "check the calibration data and learning rates")
    res["seconds"] = time.perf_counter() - t_start
    return res
