"""Grid metrics `int8_latency_ms` and `int8_speedup`: the cell's quantized UNet exported to integer kernels
(eda.integer, backend x86) and timed side by side with the FP UNet, one call at batch INT8_BATCH, interleaved
(median of INT8_REPS), so tables show each method and bit width's quality next to what it buys in speed.

Put either name in a grid's `metrics`. A cell whose model cannot run on integer kernels (e.g. W4A4: 4-bit activations
are fine, but 16-bit softmax or >8-bit weights are not) keeps its quality metrics and gets NaN here, with the reason
in the cell log.
"""

from __future__ import annotations

import logging

import torch

from bench.metrics.names import INT8_METRICS

INT8_BATCH = 8  # the reference batch; fixed so cells compare across grids and batch sizes
INT8_REPS = 5


def int8_metrics(model, qunet, cell, device: str = "cpu", log: logging.Logger | None = None) -> dict[str, float]:
    """{} unless the cell asks for an int8 metric and has a quantized UNet; else the two timings' results."""
    if qunet is None or not any(m in cell.metrics for m in INT8_METRICS):
        return {}
    from bench.errors import BenchError
    from bench.harness.timing import alternate
    from eda.integer import compile_for, integer_unet

    log = log or logging.getLogger("bench.harness.cell")
    try:
        if torch.device(device).type != "cpu":
            raise BenchError(f"int8 metrics time the x86 CPU backend; this cell ran on {device}")
        iu = compile_for(integer_unet(qunet.cpu()), "x86")
    except BenchError as e:
        log.warning("int8 metrics not computed: %s", e)
        return {m: float("nan") for m in INT8_METRICS}
    g = torch.Generator().manual_seed(cell.seed)
    x = torch.randn(INT8_BATCH, *model.sample_shape, generator=g)
    t = torch.randint(0, len(model.alphas_cumprod), (INT8_BATCH,), generator=g)
    cond = model.conditioning(INT8_BATCH, cell.seed) if model.conditioning is not None else None
    fp_unet = model.unet.cpu()
    with torch.no_grad():
        times = alternate({"fp": lambda: model.eps_fn(fp_unet, cond)(x, t),
                           "int": lambda: model.eps_fn(iu, cond)(x, t)}, INT8_REPS)
    log.info("int8: FP %.1f ms, integer %.1f ms per UNet call at batch %d", times["fp"] * 1e3, times["int"] * 1e3,
             INT8_BATCH)
    out = {"int8_latency_ms": times["int"] * 1e3, "int8_speedup": times["fp"] / times["int"]}
    return {k: v for k, v in out.items() if k in cell.metrics}
