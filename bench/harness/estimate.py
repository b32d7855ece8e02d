"""`python -m bench.run --dry-run --estimate`: device-hours per model from per-sample UNet costs measured here.

For each model of the plan that is available, the FP UNet is timed on the device the cells would use (the GPU when
one is visible) with the torch threads one actor gets: one forward pass per sample at the grid's batch size (capped
at ESTIMATE_BATCH), and one forward + backward per sample at the reconstruction batch. The cells still to run are then counted in those units:

- sampling: samples x steps per quantized cell, plus the FP samples once per seed (shared by every cell of a seed);
- calibration: the trajectories every method of the model needs (max over methods, bench.harness.cell.
  calibration_union) x steps, once per seed, plus the held-out eps-MSE pass (2 x 8 trajectories x steps per cell);
- reconstruction: for each stage of the method (eda.registry PTQMethod.stages, as configured for the cell),
  iterations x batch forward + backward passes over the whole UNet (each iteration trains every unit on its own
  part of the network, so one pass per sample in total), plus one forward pass per calibration sample to collect
  the units' inputs. Under budget = "converged" the iteration count is the cap, so the figure is an upper bound.

Not counted: the fake-quantization overhead (results/perf.md (b): about 1.1-1.3x on sampling), Inception features,
Python overhead between small units. It is an estimate for planning, printed as such, never stored with results.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict

import torch

from bench.harness.grid import FP_METHOD, Cell

ESTIMATE_BATCH = 64  # the largest batch timed (smaller when one call already takes a second)
EPS_PASSES = 2 * 8  # bench.harness.cell.EPS_MSE_SAMPLES, FP and quantized


def _median_seconds(fn, reps: int = 3) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def unit_costs(model, device: str, batch: int, train_batch: int) -> dict:
    """Seconds per sample: one FP UNet forward (`forward`) and one forward + backward (`train`)."""
    unet = model.unet.to(device).eval()
    shape = tuple(model.sample_shape)
    cond = model.conditioning(train_batch, 0) if model.conditioning is not None else None

    def call(b: int, grad: bool):
        x = torch.randn((b, *shape), device=device)
        t = torch.full((b,), 500, device=device, dtype=torch.long)
        c = None if cond is None else {k: v[:b].to(device) for k, v in cond.items()}
        with torch.set_grad_enabled(grad):
            out = model.eps_fn(unet, c)(x, t)
            if grad:
                out.float().pow(2).mean().backward()

    def per_sample(limit: int, grad: bool) -> tuple[float, int]:
        """Batch 1, 2, 4, ... up to `limit`, stopping once a call takes a second: per-sample cost falls with the
        batch until the device is busy, and a big model on a CPU must not take minutes to plan."""
        b, cost = 1, math.inf
        while True:
            seconds = _median_seconds(lambda: call(b, grad))
            cost = seconds / b
            if b >= limit or seconds > 1.0:
                return cost, b
            b = min(2 * b, limit)

    forward, b = per_sample(max(1, min(batch, ESTIMATE_BATCH)), False)
    train, tb = per_sample(max(1, min(train_batch, ESTIMATE_BATCH)), True)
    unet.zero_grad(set_to_none=True)
    return {"forward": forward, "train": train, "batch": b, "train_batch": tb}


def count_passes(model, cells: list[Cell], requests) -> dict:
    """Sample-passes of the cells (see the module docstring): forward and forward + backward, by part."""
    from bench.harness.cell import calibration_union, get_method, with_sampler

    parts: dict[str, float] = defaultdict(float)
    train_batch = 32
    seeds: set = set()
    for c in cells:
        m = with_sampler(model, c.sampler)
        steps = m.sampler.steps
        key = (c.seed, m.sampler.describe(), c.samples)
        if key not in seeds:  # shared per seed: FP samples and the calibration trajectories
            seeds.add(key)
            parts["sampling"] += c.samples * steps
            n_calib, _ = calibration_union(m, requests)
            parts["calibration"] += n_calib * steps
        if c.method == FP_METHOD:
            continue
        parts["sampling"] += c.samples * steps
        parts["calibration"] += EPS_PASSES * steps
        method = get_method(c.method).configure(m, c.bits, dict(c.overrides))
        stages = method.stages(c.bits, c.seed) if hasattr(method, "stages") else []
        for stage in stages:
            cfg = stage.config
            parts["reconstruction_train"] += cfg.iters * cfg.batch_size
            parts["reconstruction_collect"] += getattr(method, "n_samples", 0)
            train_batch = cfg.batch_size
    return {"parts": dict(parts), "train_batch": train_batch}


def estimate_model(model, cells: list[Cell], requests, device: str, threads: int = 1) -> dict:
    counted = count_passes(model, cells, requests)
    batch = max((c.batch_size for c in cells), default=ESTIMATE_BATCH)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))  # what an actor runs with (its cpus_per_worker)
    try:
        costs = unit_costs(model, device, batch, counted["train_batch"])
    finally:
        torch.set_num_threads(before)
    p = counted["parts"]
    hours = {"sampling": p.get("sampling", 0) * costs["forward"] / 3600,
             "calibration": p.get("calibration", 0) * costs["forward"] / 3600,
             "reconstruction": (p.get("reconstruction_train", 0) * costs["train"]
                                + p.get("reconstruction_collect", 0) * costs["forward"]) / 3600}
    return {"hours": hours, "total": sum(hours.values()), "costs": {**costs, "threads": max(1, int(threads))},
            "cells": len(cells)}


def estimate_line(name: str, est: dict, device: str) -> str:
    unit = "GPU-hours" if str(device).startswith("cuda") else f"{device.upper()}-hours on this machine (no GPU visible)"
    h, c = est["hours"], est["costs"]
    return (f"  estimate: {est['total']:.3g} {unit} for the {est['cells']} cells to run (sampling "
            f"{h['sampling']:.3g}, calibration {h['calibration']:.3g}, reconstruction <= {h['reconstruction']:.3g}); "
            f"measured here: UNet forward {1000 * c['forward']:.2f} ms/sample at batch {c['batch']}, forward + "
            f"backward {1000 * c['train']:.2f} ms/sample at batch {c['train_batch']}, {c['threads']} thread(s)")
