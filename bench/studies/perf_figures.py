"""The performance figures (a)-(e) of `python -m bench.perf`, each a ratio of two timings taken side by side in one
run; figure (f) is bench/studies/perf_int8.py, the page bench/studies/perf_page.py. What each figure measures is in
the docstring of bench/perf.py.

Timings alternate the two sides (A B A B ...) and report the median (bench.harness.timing.alternate), so a noisy
neighbour slows both alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness.timing import alternate

ROOT = Path(__file__).resolve().parents[2]  # the repository


# ----------------------------------------------------------------------------------------------------------------
# helpers


def row(figure: str, case: str, baseline: str, baseline_s: float, ours: str, ours_s: float, kind: str,
        target: float | None = None, **extra) -> dict:
    """kind 'speedup': ratio = baseline / ours, target is a minimum; 'overhead': ratio = ours / baseline, target is
    a maximum."""
    ratio = baseline_s / ours_s if kind == "speedup" else ours_s / baseline_s
    met = None if target is None else (ratio >= target if kind == "speedup" else ratio <= target)
    return {"figure": figure, "case": case, "baseline": baseline, "baseline_seconds": float(baseline_s),
            "ours": ours, "ours_seconds": float(ours_s), "ratio_kind": kind, "ratio": float(ratio),
            "target": target, "target_met": met, "details": json.dumps(extra, sort_keys=True, default=str)}


def cifar_unet():
    """google/ddpm-cifar10-32's UNet (35.7M parameters) as diffusers configures it, random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                             "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                       downsample_padding=0).eval()


def _calib(unet, n: int, seed: int = 0):
    from eda.trajectories import CalibSet

    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return CalibSet(torch.randn(n, c, s, s, generator=g), torch.randint(0, 1000, (n,), generator=g))


def _quantized(unet, bits: str, calib):
    from eda.policy import BitPolicy
    from eda.wrap import init_ranges, quantize_unet

    q = quantize_unet(unet, BitPolicy.from_bits(bits, w_init="minmax", a_init="minmax"))
    init_ranges(q, calib, batch_size=len(calib))
    return q


# ----------------------------------------------------------------------------------------------------------------
# (a) reconstruction iteration: cached targets vs the official three forwards

class _UnitBench:
    """One unit set up as eda.recon does (AdaRound on its weights, LSQ steps and QDrop on its activations, FBR loss
    over the inner layers but the last, two Adam optimisers), with both iteration schemes."""

    def __init__(self, qmodel, fp_unet, unit, calib, batch: int):
        from eda.capture import collect_inputs
        from eda.fbr import channel_dim, fbr_layers
        from eda.recon import attach_adaround, unit_act_quantizers
        from eda.units import unit_layers

        self.unit, self.batch = unit, batch
        self.fp_unit = fp_unet.get_submodule(unit.name)
        layers = unit_layers(unit)
        self.inner = fbr_layers(unit.module)
        self.dims = {n: channel_dim(unit.kind, layers[n]) for n in self.inner}
        self.q_in = collect_inputs(qmodel, unit.module, calib, batch, "cpu", unit.name)
        self.fp_in = collect_inputs(fp_unet, self.fp_unit, calib, batch, "cpu", unit.name)
        ada = attach_adaround(layers)
        acts = [q for q in unit_act_quantizers(unit) if q.enabled and q.initialized]
        for q in acts:
            q.learn_delta(True)
            q.qdrop_prob, q.training_qdrop = 0.5, True
        self.opts = [torch.optim.Adam([q.alpha for q in ada], lr=1e-3)]
        if acts:
            self.opts.append(torch.optim.Adam([q.delta for q in acts], lr=1e-4))
        sel = torch.arange(batch)
        self.args, self.kwargs = self.q_in.get(sel, "cpu")
        self.fp_args, self.fp_kwargs = self.fp_in.get(sel, "cpu")
        self.cached = self._fp_targets()  # ours: computed once per calibration set (here: for this batch)

    def _fp_targets(self):
        from eda.capture import first_output
        from eda.fbr import capture_outputs

        with torch.no_grad(), capture_outputs(self.fp_unit, self.inner) as store:
            out = first_output(self.fp_unit(*self.fp_args, **self.fp_kwargs))
        return out, dict(store)

    def _fbr_loss(self, out, inner_out: dict, targets):
        """FBR with gamma 0.8: eda.fbr.fbr_loss, the loss eda.recon runs."""
        from eda.fbr import fbr_loss

        return fbr_loss(out, targets[0], inner_out, targets[1], 0.8, self.dims)

    def _step(self, loss):
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.opts:
            o.step()

    def _quant_forward(self, tap: bool):
        from eda.capture import first_output
        from eda.fbr import capture_outputs

        with capture_outputs(self.unit.module, self.inner if tap else []) as store:
            out = first_output(self.unit.module(*self.args, **self.kwargs))
        return out, dict(store)

    def cached_iteration(self):
        """Ours: one quantized forward (inner outputs tapped on the way), loss against the cached targets."""
        out, inner = self._quant_forward(tap=True)
        self._step(self._fbr_loss(out, inner, self.cached))

    def official_iteration(self):
        """The official scheme: quantized forward for the block output, an FP forward for the targets, and another
        quantized forward for the inner-layer outputs; the loss back-propagates through both quantized passes."""
        out, _ = self._quant_forward(tap=False)
        targets = self._fp_targets()
        _, inner = self._quant_forward(tap=True)
        self._step(self._fbr_loss(out, inner, targets))


def _units_by_kind(qmodel):
    from eda.units import reconstruction_units

    first = {}
    for u in reconstruction_units(qmodel):
        first.setdefault(u.kind, u)
    return first


def fig_recon(args) -> list[dict]:
    from bench.models.registry import load_model

    rows = []
    cases = [("digits-ddpm", load_model("digits-ddpm").unet.eval(), 32, "official batch 32")]
    cases.append(("cifar10-ddim (random weights)", cifar_unet(), 4 if args.quick else 8,
                  "batch reduced from 32 for CPU"))
    reps = 3 if args.quick else 5
    for model_name, unet, batch, note in cases:
        calib = _calib(unet, batch)
        q = _quantized(unet, "W4A8", calib)
        for kind, unit in _units_by_kind(q).items():
            ub = _UnitBench(q, unet, unit, calib, batch)
            t = alternate({"cached": ub.cached_iteration, "official": ub.official_iteration}, reps)
            rows.append(row("recon", f"{model_name} {kind} ({unit.name})", "official: 3 forwards / iteration",
                            t["official"], "cached FP targets: 1 forward", t["cached"], "speedup",
                            batch=batch, note=note, iterations=reps, inner_layers=len(ub.inner)))
            print(f"  recon {model_name:28s} {kind:10s} official {t['official']*1e3:8.1f} ms  cached "
                  f"{t['cached']*1e3:8.1f} ms  x{t['official']/t['cached']:.2f}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (b) fake-quant sampling vs FP

@contextlib.contextmanager
def fast_path(on: bool):
    import eda.quantizer
    import eda.wrap

    old = eda.quantizer.FUSED_INFERENCE, eda.wrap.CACHE_QUANT_WEIGHTS
    eda.quantizer.FUSED_INFERENCE = eda.wrap.CACHE_QUANT_WEIGHTS = on
    try:
        yield
    finally:
        eda.quantizer.FUSED_INFERENCE, eda.wrap.CACHE_QUANT_WEIGHTS = old


@contextlib.contextmanager
def quantizer_flag(name: str, value: bool):
    """eda.quantizer.<name> set to value inside the block, restored after it (the switches between code paths)."""
    import eda.quantizer

    old = getattr(eda.quantizer, name)
    setattr(eda.quantizer, name, value)
    try:
        yield
    finally:
        setattr(eda.quantizer, name, old)


def compiled_path():
    """The opt-in torch.compile'd fake-quant kernel (EDA_BENCH_COMPILE_FAKEQUANT=1)."""
    return quantizer_flag("COMPILED_INFERENCE", True)


VARIANTS = (("fq", "fake-quant (inference fast path)"), ("compiled", "fake-quant, compiled kernel (opt-in)"),
            ("before", "fake-quant before the fast path"))


def fig_sampling(args) -> list[dict]:
    import dataclasses

    from bench.models.registry import load_model

    rows = []
    model = load_model("digits-ddpm")
    steps = 10 if args.quick else 20
    model = dataclasses.replace(model, sampler=dataclasses.replace(model.sampler, steps=steps))
    n = 64 if args.quick else 256
    reps = 3
    calib = _calib(model.unet, 64)
    for bits in ("W8A8", "W4A8"):
        q = _quantized(model.unet, bits, calib)

        def gen(unet):
            return lambda: model.generate(n, seed=0, unet=unet, batch_size=n)

        def before():
            with fast_path(False):
                model.generate(n, seed=0, unet=q, batch_size=n)

        def comp():
            with compiled_path():
                model.generate(n, seed=0, unet=q, batch_size=n)

        t = alternate({"fp": gen(model.unet), "fq": gen(q), "compiled": comp, "before": before}, reps)
        for key, label in VARIANTS:
            rows.append(row("sampling", f"digits-ddpm {bits}", "FP sampling", t["fp"], label, t[key], "overhead",
                            1.3, samples=n, batch=n, steps=steps, threads=torch.get_num_threads()))
        print(f"  sampling digits {bits}: FP {t['fp']:.2f}s  " + ", ".join(
            f"{label} {t[k]:.2f}s (x{t[k] / t['fp']:.2f})" for k, label in VARIANTS), flush=True)
    # CIFAR-10 UNet: one sampling step (one UNet call) at a small batch
    unet = cifar_unet()
    b = 2 if args.quick else 8
    x, tt = torch.randn(b, 3, 32, 32), torch.full((b,), 500)
    for bits in ("W8A8", "W4A8"):
        q = _quantized(unet, bits, _calib(unet, 4))
        with torch.no_grad():
            def before():
                with fast_path(False):
                    q(x, tt)

            def comp():
                with compiled_path():
                    q(x, tt)

            t = alternate({"fp": lambda: unet(x, tt), "fq": lambda: q(x, tt), "compiled": comp, "before": before},
                          reps)
        for key, label in VARIANTS:
            rows.append(row("sampling", f"cifar10-ddim {bits} (one step)", "FP UNet call", t["fp"], label, t[key],
                            "overhead", 1.3, batch=b, threads=torch.get_num_threads()))
        print(f"  sampling cifar {bits} (one step): FP {t['fp']:.3f}s  " + ", ".join(
            f"{label} {t[k]:.3f}s (x{t[k] / t['fp']:.2f})" for k, label in VARIANTS), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (c) shared FP artifacts vs recomputing them per cell

def _small_cells(samples: int, methods=("fp", "rtn", "eda-dm"), bits=("W8A8", "W4A8")):
    from bench.harness.grid import Cell

    sampler = {"kind": "ddim", "steps": 100, "eta": 0.0, "skip": "quad"}
    metrics = ("fid_vs_fp", "digits_fid", "digits_fid_vs_fp")
    overrides = {"iters_scale": 0.002, "n_samples": samples}
    cells = []
    for m in methods:
        for b in (("FP",) if m == "fp" else bits):
            cells.append(Cell("perf", "digits-ddpm", m, b, 0, samples, sampler, metrics,
                              {} if m == "fp" else dict(overrides), batch_size=samples))
    return cells


def fig_artifacts(args) -> list[dict]:
    import bench.metrics.inception
    from bench.harness.artifacts import ArtifactCache
    from bench.harness.cell import run_cell
    from bench.models.registry import load_model

    model = load_model("digits-ddpm")
    samples = 32 if args.quick else 64
    cells = _small_cells(samples, bits=("W8A8", "W4A8") if args.quick else ("W8A8", "W4A8", "W3A8"))
    requests = [(c.method, dict(c.overrides)) for c in cells]
    context = {"run_id": "perf", "git_commit": ""}
    shared_s, per_cell_s = [], []
    memo = bench.metrics.inception._FEATURES
    with tempfile.TemporaryDirectory() as tmp:
        memo.clear()
        shared = ArtifactCache(Path(tmp) / "shared")
        # Interleaved cell by cell (shared, then recomputed), so both sides see the same machine load.
        for i, c in enumerate(cells):
            t = time.perf_counter()
            run_cell(model, c, shared, requests, context)
            shared_s.append(time.perf_counter() - t)
            kept = list(memo.items())
            memo.clear()  # the recomputing side gets no in-process memo either
            t = time.perf_counter()
            run_cell(model, c, ArtifactCache(Path(tmp) / f"cell{i}"), requests, context)
            per_cell_s.append(time.perf_counter() - t)
            memo.clear()
            memo.update(kept)
    t_shared, t_per_cell = sum(shared_s), sum(per_cell_s)
    print(f"  artifacts: {len(cells)} cells shared {t_shared:.1f}s, recomputed per cell {t_per_cell:.1f}s "
          f"(x{t_per_cell / t_shared:.2f})", flush=True)
    rows = [row("artifacts", f"digits-ddpm, all {len(cells)} cells, {samples} samples",
                "FP artifacts recomputed per cell", t_per_cell, "shared FP artifacts", t_shared, "speedup", 2.0,
                cells=[f"{c.method}/{c.bits}" for c in cells], samples=samples,
                shared=["FP samples", "FP trajectories", "FP noise predictions", "FP Inception features"])]
    # Per cell: the first cell of a shared run pays for the artifacts, the later ones reuse them.
    for c, a, b in zip(cells, per_cell_s, shared_s):
        rows.append(row("artifacts", f"  cell {c.method} {c.bits}", "recomputed", a, "shared", b, "speedup", None))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (d) Ray scaling

GRID_TOML = """name = "perf-ray"
description = "bench.perf Ray scaling: identical rtn cells"
[defaults]
methods = ["rtn"]
bits = {bits}
seeds = [0]
samples = {samples}
metrics = ["digits_fid"]
batch_size = {samples}
[set]
n_samples = {samples}
[resources]
cpus_per_worker = 1
gpus_per_worker = 1
[[model]]
name = "digits-ddpm"
sampler = {{ kind = "ddim", steps = 100, eta = 0.0, skip = "quad" }}
"""


def fig_ray(args) -> list[dict]:
    n_cpu = os.cpu_count() or 1
    workers = sorted({1, *[w for w in (2, 4, 8) if w <= n_cpu]})
    bits = ["W8A8", "W6A8", "W4A8", "W3A8"][: (2 if args.quick else 4)]  # identical-cost rtn cells
    samples = 32 if args.quick else 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "perf-ray.toml"
        grid.write_text(GRID_TOML.format(bits=json.dumps(bits), samples=samples))
        env = {**os.environ, "EDA_BENCH_CACHE": str(Path(tmp) / "cache")}

        def run(k: int, out: str, only_bits: str | None = None) -> float:
            cmd = [sys.executable, "-m", "bench.run", "--grid", str(grid), "--out", str(Path(tmp) / out),
                   "--max-workers", str(k), "--no-resume", "--no-progress"]
            if only_bits:
                cmd += ["--bits", only_bits]
            t = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                raise RuntimeError(f"bench.run failed ({p.returncode}): {p.stderr[-2000:]}")
            return time.perf_counter() - t

        run(1, "warm", bits[0])  # FP samples and trajectories into the shared cache, so every run sees the same work
        start = run(1, "startup", "W8A8")  # Ray start-up plus one cell, to separate start-up from throughput
        times = {k: run(k, f"w{k}") for k in workers}
    base = times[1]
    for k in workers:
        speedup = base / times[k]
        rows.append(row("ray", f"{len(bits)} rtn cells, {k} worker(s)", "1 worker", base, f"{k} workers", times[k],
                        "speedup", None, workers=k, efficiency=speedup / k, cells=len(bits), samples=samples,
                        one_cell_run_seconds=start, cpus=n_cpu))
        print(f"  ray: {k} worker(s) {times[k]:.1f}s  speed-up x{speedup:.2f}  efficiency {speedup / k:.2f}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# (e) EDA-DM W4A8 on the CIFAR-10 UNet at the official budget, extrapolated

def fig_cifar(args) -> list[dict]:
    """Pieces measured on CPU and scaled to the official script (`scripts/for_cifar.sh`): trajectories of N = 1024 samples
    x 100 DDIM steps (FP), activation ranges over the 1024 calibration samples, then per unit: input collection
    (a quantized and an FP pass over the calibration set up to the unit, bounded by a whole UNet pass each) and
    5000 iterations at batch 32 (each unit's iteration timed at a small batch and scaled linearly)."""
    from eda.units import reconstruction_units

    N, steps, iters, batch = 1024, 100, 5000, 32
    unet = cifar_unet()
    b = 2 if args.quick else 4
    calib = _calib(unet, b)
    x, tt = calib.xs, calib.ts
    with torch.no_grad():
        t_call = alternate({"fp": lambda: unet(x, tt)}, 2)["fp"] / b  # seconds per sample per UNet call
    t = time.perf_counter()
    q = _quantized(unet, "W4A8", calib)
    t_ranges = (time.perf_counter() - t) / b
    units = reconstruction_units(q)
    by_kind: dict[str, list[float]] = {}
    measured = units if not args.quick else list(_units_by_kind(q).values())
    for u in measured:
        ub = _UnitBench(q, unet, u, calib, b)
        by_kind.setdefault(u.kind, []).append(alternate({"it": ub.cached_iteration}, 2)["it"])
    per_kind = {k: statistics.mean(v) for k, v in by_kind.items()}
    recon_s = sum(per_kind[u.kind] * (batch / b) * iters for u in units)
    collect_s = len(units) * 2 * N * t_call
    total = N * steps * t_call + N * t_ranges + collect_s + recon_s
    pieces = {"trajectories_s": N * steps * t_call, "act_ranges_s": N * t_ranges, "input_collection_s": collect_s,
              "reconstruction_s": recon_s}
    print(f"  cifar EDA-DM W4A8 at the official budget, extrapolated on {platform.processor() or 'CPU'}: "
          f"{total / 3600:.1f} h ({', '.join(f'{k} {v / 3600:.2f} h' for k, v in pieces.items())})", flush=True)
    return [row("cifar", "cifar10-ddim EDA-DM W4A8, official budget (extrapolated, this machine)",
                "target: 20 min on one H100", 20 * 60, "extrapolated here", total, "overhead", None,
                units=len(units), measured_units=len(measured), iteration_batch=b,
                per_iteration_s_at_batch=per_kind, seconds_per_sample_call=t_call, **pieces,
                gpu="not lent in this session" if not torch.cuda.is_available() else torch.cuda.get_device_name())]


# ----------------------------------------------------------------------------------------------------------------
# (g) EDA-DM W4A8 on digits at the official budget: the reconstruction throughput target


def fused_training(on: bool):
    """eda.quantizer.FUSED_TRAINING: the activation fake-quant of training as one autograd Function (on) or the
    composed torch ops of the official formula (off, the path before it)."""
    return quantizer_flag("FUSED_TRAINING", on)


def _top_ops(fn, k: int = 6) -> list[dict]:
    """The k ops with the most self CPU time in one call of fn (torch.profiler), as fractions of the total."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:k]]


def fig_budget(args) -> list[dict]:
    """EDA-DM W4A8 on digits-ddpm at its official budget (N = 1024 calibration samples, 5000 iterations at batch 32
    per unit; EDA-DM scripts/for_cifar.sh) projected from pieces measured here at the official batch: one FP UNet
    call per sample (trajectories of 100 steps, activation ranges, input collection: a quantized and an FP pass up
    to each unit, bounded by a whole UNet pass each) and every unit's reconstruction iteration, with the fused
    training fake-quant and with the composed ops before it, side by side. Target: 30 minutes on 2 cores."""
    from bench.models.registry import load_model
    from eda.units import reconstruction_units

    N, steps, iters, batch = 1024, 100, 5000, 32
    unet = load_model("digits-ddpm").unet.eval()
    calib = _calib(unet, batch)
    with torch.no_grad():
        t_call = alternate({"fp": lambda: unet(calib.xs, calib.ts)}, 3)["fp"] / batch
    t = time.perf_counter()
    q = _quantized(unet, "W4A8", calib)
    t_ranges = (time.perf_counter() - t) / batch
    units = reconstruction_units(q)
    reps = 2 if args.quick else 4
    per_unit = {}
    for u in units:
        ub = _UnitBench(q, unet, u, calib, batch)

        def fused(ub=ub):
            with fused_training(True):
                ub.cached_iteration()

        def composed(ub=ub):
            with fused_training(False):
                ub.cached_iteration()

        per_unit[u.name] = (u.kind, alternate({"fused": fused, "composed": composed}, reps))
    slowest = max(per_unit, key=lambda n: per_unit[n][1]["fused"])
    ub = _UnitBench(q, unet, next(u for u in units if u.name == slowest), calib, batch)
    with fused_training(True):
        ops = _top_ops(ub.cached_iteration)
    fixed = N * steps * t_call + N * t_ranges + len(units) * 2 * N * t_call
    recon = {k: iters * sum(t[k] for _, t in per_unit.values()) for k in ("fused", "composed")}
    total = {k: fixed + v for k, v in recon.items()}
    threads = torch.get_num_threads()
    print(f"  digits EDA-DM W4A8 at the official budget ({threads} thread(s)): fused {total['fused'] / 60:.1f} min, "
          f"composed {total['composed'] / 60:.1f} min (reconstruction {recon['fused'] / 60:.1f} / "
          f"{recon['composed'] / 60:.1f} min, the rest {fixed / 60:.1f} min); slowest unit {slowest}: "
          + ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:4]), flush=True)
    extra = dict(units=len(units), threads=threads, per_unit_iteration_s={n: t for n, (_, t) in per_unit.items()},
                 fixed_s=fixed, seconds_per_sample_call=t_call, slowest_unit=slowest, slowest_unit_top_ops=ops)
    return [row("budget", "digits-ddpm EDA-DM W4A8, official budget: fused training fake-quant vs composed ops",
                "composed ops (before)", total["composed"], "fused (now)", total["fused"], "speedup", None, **extra),
            row("budget", "digits-ddpm EDA-DM W4A8, official budget (projected, this machine) vs the 30-minute target",
                "target: 30 min on 2 cores", 30 * 60, "projected here", total["fused"], "overhead", 1.0, **extra)]
