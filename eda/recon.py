"""Block-wise and layer-wise reconstruction: the BRECQ / Q-Diffusion / EDA-DM engine (EDA-DM Sec. 4.2; official
`qdiff/block_recon.py::block_reconstruction` and `qdiff/layer_recon.py::layer_reconstruction`).

For each unit in forward order:
1. inputs (`eda.capture`): the unit's call arguments (args and kwargs such as temb or encoder_hidden_states) from
   the FP model and, with `asym=True`, from the already-quantized upstream model, which the unit then learns from;
   without asym the unit sees FP inputs (Q-Diffusion's activation stage);
2. targets: the FP unit's output on the FP input and, for FBR, the outputs of its inner layers (`eda.fbr`). These
   are computed ONCE per calibration set and cached (`cache_targets=True`); the official code recomputes them every
   iteration (three block forwards per iteration: quantized, FP, quantized again for the layer outputs, with a
   fresh QDrop draw); `cache_targets=False` recomputes them too (two forwards: quantized + FP);
3. Adam on the AdaRound alphas (lr_w) and on the activation step sizes (lr_a), with CosineAnnealingLR(T_max=iters,
   eta_min=0) or no scheduler; batches of `batch_size` calibration samples drawn without replacement; QDrop:
   activation quantizers keep FP values with prob `qdrop_prob`, and the unit input is the quantized one with prob
   `input_prob`, else the FP one; the optional AdaRound regulariser with b annealed 20 -> 2 after the warm-up;
4. rounding is hardened (alpha >= 0) and the deltas frozen.

Loss: "mse" = lp_loss(p=2) on the unit output; "lp" = lp_loss(p); "fbr" = `eda.fbr.fbr_loss`: the output term +
gamma * lp_loss(p=2) of every inner quantized layer but the last in the official registration order. The reconstruction uses the
quant state the model is in (weights only, or weights + activations).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from eda.errors import BenchError, UsageError
from eda.adaround import AdaRoundQuantizer, annealed_b
from eda.capture import collect_inputs, first_output
from eda.convergence import plateaued, summarize, window_size
from eda.fbr import capture_outputs, channel_dim, fbr_layers, fbr_loss
from eda.journal import StageJournal
from eda import quantizer
from eda.quantizer import UniformQuantizer, lp_loss
from eda.trajectories import CalibSet
from eda.units import Unit, reconstruction_units, unit_layers
from eda.wrap import QuantAttnProcessor, QuantLayer, get_quant_state

# INFO lines are live progress when a harness listens (bench's cell logs); silent elsewhere
log = logging.getLogger(__name__)


@dataclass
class ReconConfig:
    iters: int = 1000  # EDA-DM ImageNet/COCO; CIFAR/LSUN use 5000 (`scripts/sample_*.py` kwargs)
    batch_size: int = 32
    lr_w: float = 5e-2  # EDA-DM CIFAR W8A8; per setting in bench.models.zoo
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
    # "cosine": CosineAnnealingLR(T_max=iters, eta_min=0) on both optimisers, as EDA-DM (and Q-Diffusion's
    # activation stage); "constant": no scheduler, as BRECQ / Q-Diffusion's AdaRound weight stage; "cosine_acts":
    # the step sizes' optimiser cosine, the rounding's constant, as QDrop's layer/block_reconstruction
    lr_schedule: str = "cosine"
    granularity: str = "block"  # "block" (resnet/attention/transformer blocks + leftover layers) | "layer"
    only: tuple[str, ...] | None = None  # restrict to these unit names (tests, ablations)
    collect_batch_size: int = 64
    max_loss_ratio: float = 1e4  # loss above ratio x the first iteration's loss counts as divergence
    eval_mse: bool = True  # report each unit's deterministic output MSE before and after
    # "fraction": run `iters`; "converged": stop a unit once its loss curve has plateaued (eda.convergence), with
    # `iters` as the cap. A stage with the AdaRound regulariser never stops early: its temperature b anneals over
    # the whole `iters` (BRECQ's LinearTempDecay, used by Q-Diffusion and PTQ4DM), so a unit stopped on a plateau of
    # the reconstruction term would harden rounding variables the regulariser has not yet pushed to 0 or 1.
    budget: str = "fraction"

    def __post_init__(self):
        if self.loss not in ("mse", "fbr", "lp"):
            raise UsageError(f"reconstruction loss must be mse, fbr or lp, got {self.loss!r}")
        if self.lr_schedule not in ("cosine", "constant", "cosine_acts"):
            raise UsageError(f"lr_schedule must be cosine, constant or cosine_acts, got {self.lr_schedule!r}")
        if self.budget not in ("fraction", "converged"):
            raise UsageError(f"budget must be fraction or converged, got {self.budget!r}")
        if self.iters < 0 or self.batch_size < 1:
            raise UsageError(f"need iters >= 0 and batch_size >= 1, got {self.iters} and {self.batch_size}")


def unit_act_quantizers(unit: Unit) -> list[UniformQuantizer]:
    """The activation quantizers inside a unit (layer inputs, attention q/k/v/softmax) that quantize something."""
    qs = []
    for m in unit.module.modules():
        if isinstance(m, QuantLayer) and m.act_allowed or isinstance(m, QuantAttnProcessor):
            qs += m.act_quantizers()
    return qs


def minibatch(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of one reconstruction batch, drawn without replacement (`random.sample(range(sz), batch_size)` in
    EDA-DM's block_recon.py, `torch.randperm(n)[:batch_size]` in Q-Diffusion's)."""
    return torch.randperm(n, generator=gen)[:batch_size]


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
                progress: bool = True, journal: StageJournal | None = None) -> dict:
    """Reconstruct every unit of `qmodel` in forward order against `fp_unet`; returns a report
    {seconds, restored, restored_seconds, units: {name: {kind, losses (every iteration), loss
    (eda.convergence.summarize), layer_terms, terms_first, seconds, mse_before, mse_after}}}.

    With a `journal` (eda.journal), units it holds are restored instead of reconstructed, as long as they form an
    unbroken run from the first unit, and each unit reconstructed here is journalled when it is done."""
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
    report = {"units": {}, "config": dict(vars(cfg)), "restored": 0, "restored_seconds": 0.0}
    t0 = time.perf_counter()
    restoring = journal is not None
    for idx, unit in enumerate(units):
        fp_unit = fp_modules.get(unit.name)
        if fp_unit is None:
            raise BenchError(f"unit {unit.name} has no counterpart in the FP UNet; pass the UNet that was quantized")
        entry = journal.load(idx, unit.name) if restoring else None
        if entry is not None:
            restore_unit(unit, entry.state, cfg)
            report["units"][unit.name] = entry.report
            report["restored"] += 1
            report["restored_seconds"] += float(entry.report.get("seconds") or 0.0)
            log.info("reconstruction unit %d/%d: %s restored from the journal", idx + 1, len(units), unit.name)
            continue
        if restoring:
            restoring = False
            journal.truncate(idx)  # later entries were reconstructed after a state this run does not have
        log.info("reconstruction unit %d/%d: %s (%s, %d iterations)", idx + 1, len(units), unit.name, unit.kind,
                 cfg.iters)
        res = _reconstruct_unit(qmodel, fp_unet, unit, fp_unit, calib, cfg, idx, device, w_on, a_on, progress)
        report["units"][unit.name] = res
        if journal is not None:
            journal.save(idx, unit.name, unit_state(unit), res)
    report["seconds"] = time.perf_counter() - t0
    return report


def unit_state(unit: Unit) -> dict[str, torch.Tensor]:
    """What reconstruction changed in a unit: its quantizers' tensors (names relative to the unit). The FP weights
    and biases are left out: reconstruction learns rounding and step sizes, never the weights themselves."""
    return {k: v for k, v in unit.module.state_dict().items() if "_quantizer" in k}


def restore_unit(unit: Unit, state: dict[str, torch.Tensor], cfg: ReconConfig) -> None:
    """Put a journalled unit back as reconstruction left it: AdaRound (hardened) where the journal holds alphas,
    then every quantizer tensor loaded."""
    for lname, layer in unit_layers(unit).items():
        prefix = f"{lname}." if lname else ""
        w = layer.module.weight.detach()
        for qname, sl in layer.weight_parts():
            if f"{prefix}{qname}.alpha" in state:
                q = getattr(layer, qname)
                if isinstance(q, UniformQuantizer):
                    q = AdaRoundQuantizer(q, w[:, sl])
                    setattr(layer, qname, q)
                q.harden()
    missing, unexpected = unit.module.load_state_dict(state, strict=False)
    missing = [k for k in missing if "_quantizer" in k]
    if missing or unexpected:
        raise BenchError(f"the journal entry of unit {unit.name} does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); delete the journal folder and quantize again")
    for q in unit_act_quantizers(unit):
        q.qdrop_prob = cfg.qdrop_prob  # as _reconstruct_unit leaves it (inactive outside training)


def _reconstruct_unit(qmodel, fp_unet, unit: Unit, fp_unit: nn.Module, calib: CalibSet, cfg: ReconConfig, idx: int,
                      device, w_on: bool, a_on: bool, progress: bool) -> dict:
    t_start = time.perf_counter()
    seed = cfg.seed * 100_003 + idx
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layers = unit_layers(unit)
    inner = fbr_layers(unit.module) if cfg.loss == "fbr" and cfg.gamma else []
    dims = {n: channel_dim(unit.kind, layers[n]) for n in inner}
    q_act = unit_act_quantizers(unit) if a_on else []

    # Inputs (`save_inp_oup_data`): the FP model's always (targets, QDrop's FP half); with asym also the quantized
    # upstream model's, which the unit then reconstructs from. Without asym the unit sees FP inputs, as Q-Diffusion's
    # activation stage (`GetLayerInpOut` with asym=False runs the network in FP).
    fp_in = collect_inputs(fp_unet, fp_unit, calib, cfg.collect_batch_size, device, unit.name)
    q_in = collect_inputs(qmodel, unit.module, calib, cfg.collect_batch_size, device, unit.name) if cfg.asym \
        else fp_in
    main = q_in.main_key()
    M = len(calib)

    def fp_forward(sl):
        """FP unit output and inner-layer outputs on the FP inputs of samples `sl`."""
        with torch.no_grad(), capture_outputs(fp_unit, inner) as store:
            args, kwargs = fp_in.get(sl, device)
            out = first_output(fp_unit(*args, **kwargs))
        return out, dict(store)

    cached = None
    if cfg.cache_targets:
        outs, inn = [], {n: [] for n in inner}
        for s in range(0, M, cfg.collect_batch_size):
            o, i = fp_forward(slice(s, s + cfg.collect_batch_size))
            outs.append(o.cpu())
            for n in inner:
                inn[n].append(i[n].cpu())
        cached = (torch.cat(outs), {n: torch.cat(v) for n, v in inn.items()})

    def targets(sl):
        if cached is not None:
            return cached[0][sl].to(device), {n: v[sl].to(device) for n, v in cached[1].items()}
        return fp_forward(sl)

    def unit_loss(out, layer_outs, tgt, tgt_inner):
        if cfg.loss == "fbr":
            return fbr_loss(out, tgt, layer_outs, tgt_inner, cfg.gamma, dims)
        return lp_loss(out, tgt, p=cfg.p if cfg.loss == "lp" else 2.0)

    def record_terms(out, layer_outs, tgt, tgt_inner):
        """The first iteration's block term and (unweighted) layer term: what the loss that ran was made of."""
        with torch.no_grad():
            block = lp_loss(out, tgt, p=cfg.p if cfg.loss == "lp" else 2.0).item()
            layers = (fbr_loss(out, tgt, layer_outs, tgt_inner, 1.0, dims) - fbr_loss(out, tgt, {}, {}, 0.0)).item() \
                if inner else 0.0
        res["terms_first"] = {"block": block, "layers": layers}

    def eval_mse() -> float:
        tot = 0.0
        with torch.no_grad():
            for s in range(0, M, cfg.collect_batch_size):
                sl = slice(s, s + cfg.collect_batch_size)
                args, kwargs = q_in.get(sl, device)
                out = first_output(unit.module(*args, **kwargs))
                tot += lp_loss(out, targets(sl)[0]).item() * len(out)
        return tot / M

    res = {"kind": unit.kind, "losses": [], "layer_terms": list(inner)}
    if cfg.eval_mse:
        res["mse_before"] = eval_mse()

    # learnable parameters: AdaRound alphas for weights, step sizes for activations
    ada = attach_adaround(layers) if cfg.learn_weights and w_on and cfg.iters > 0 else []
    # The rounding regulariser covers each layer's `weight_quantizer` only, not the split half `weight_quantizer_0`
    # (LossFunction in Q-Diffusion's / BRECQ's `block_recon.py` loops over QuantModules' weight_quantizer).
    reg_qs = [layer.weight_quantizer for layer in layers.values() if any(layer.weight_quantizer is q for q in ada)]
    deltas = []
    if cfg.learn_act_delta and cfg.iters > 0:
        for q in q_act:
            if q.enabled and q.initialized and q.n_bits < 16:  # 16-bit softmax excluded (Q-Diffusion block_recon)
                q.learn_delta(True)
                deltas.append(q.delta)
    opts, annealed = [], []
    if ada:
        opts.append(torch.optim.Adam([q.alpha for q in ada], lr=cfg.lr_w))
        if cfg.lr_schedule == "cosine":
            annealed.append(opts[-1])
    if deltas:
        opts.append(torch.optim.Adam(deltas, lr=cfg.lr_a))
        if cfg.lr_schedule in ("cosine", "cosine_acts"):
            annealed.append(opts[-1])
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(cfg.iters, 1), eta_min=0) for o in annealed]
    iters = cfg.iters if opts else 0
    for q in q_act:
        q.qdrop_prob, q.training_qdrop = cfg.qdrop_prob, True

    window = window_size(iters)
    early_stop = cfg.budget == "converged" and not cfg.adaround_reg  # see ReconConfig.budget
    bar = range(iters)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"recon {unit.name}", unit="it", leave=False)
    first_loss = None
    try:
        for it in bar:
            sel = minibatch(M, cfg.batch_size, gen)
            args, kwargs = q_in.get(sel, device)
            if cfg.asym and cfg.input_prob < 1.0:
                # QDrop on the unit input: each element is the quantized one with prob input_prob, else the FP one
                fp_args, fp_kwargs = fp_in.get(sel, device)
                where_q, where_fp = (args, fp_args) if main[0] == "a" else (kwargs, fp_kwargs)
                qv, fpv = where_q[main[1]], where_fp[main[1]]
                pick_q = torch.rand(qv.shape, generator=gen).lt_(cfg.input_prob).to(device)  # 1.0: quantized
                # lerp is exact at weights 0 and 1 and several times faster than torch.where on CPU
                where_q[main[1]] = torch.lerp(fpv, qv, pick_q) if quantizer.FUSED_TRAINING else \
                    torch.where(pick_q.bool(), qv, fpv)
            tgt, tgt_inner = targets(sel)
            with capture_outputs(unit.module, inner) as layer_outs:
                out = first_output(unit.module(*args, **kwargs))
            rec = unit_loss(out, layer_outs, tgt, tgt_inner)
            if it == 0:
                record_terms(out, layer_outs, tgt, tgt_inner)
            loss = rec
            # BRECQ's LinearTempDecay / LossFunction count iterations from 1
            b = annealed_b(it + 1, iters, cfg.warmup, cfg.b_range) if cfg.adaround_reg else None
            if b is not None and reg_qs:
                loss = loss + cfg.adaround_reg * sum(q.reg_loss(b) for q in reg_qs)
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
            done = it + 1
            if early_stop and done % window == 0 and done * 10 >= iters and plateaued(res["losses"], window):
                break
    finally:
        for q in ada:
            q.harden()  # hard rounding after the unit (alpha >= 0)
        for q in q_act:
            q.learn_delta(False)
            q.training_qdrop = False
    res["loss"] = summarize(res["losses"], iters)
    if cfg.eval_mse:
        res["mse_after"] = eval_mse()
        if not math.isfinite(res["mse_after"]):
            raise BenchError(f"reconstruction of unit {unit.name} ({unit.kind}) produced non-finite outputs; "
                             "check the calibration data and learning rates")
    res["seconds"] = time.perf_counter() - t_start
    return res
