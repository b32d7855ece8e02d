"""Run one cell: quantize the FP model with a method, sample from the cell's seed, evaluate, return a store row.

The FP trajectories and FP samples come from the ArtifactCache (shared by every method and bit width of the model);
the method is looked up by name in eda.registry, never imported directly.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import resource
import time
import traceback
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness.artifacts import ArtifactCache, model_fingerprint
from bench.harness.heap import release_freed
from bench.errors import BenchError
from bench.harness.grid import FP_METHOD, Cell
from bench.harness.int8_cell import int8_metrics
from bench.harness.provenance import code_state, cpu_kernels, host, package_versions
from bench.models.sampling import SamplerConfig
from bench.harness.seeds import calib_seed, eps_seed, sample_seed
from bench.harness.store import DISK_FULL, empty_row
from bench.metrics.names import HARNESS_METRICS, METRICS, VS_FP

EPS_MSE_SAMPLES = 8  # held-out trajectories for the per-step noise-prediction error vs FP (cheap: one batched pass)
SAMPLE_GRID = 16  # images per cell in the saved PNG sample grid
SHARD_DTYPE = torch.float16  # cached FP samples (FPImages): half the disk of float32, ~1e-7 squared error


def get_method(name: str):
    from eda.registry import get_method as _get

    return _get(name)


def available_methods() -> list[str]:
    try:
        from eda.registry import available_methods as _avail
    except ImportError:
        return [FP_METHOD]
    return list(_avail())


def with_sampler(model, sampler: dict | None):
    """The model with the cell's sampler settings (a shallow copy; the UNet is shared)."""
    if not sampler:
        return model
    return dataclasses.replace(model, sampler=SamplerConfig(**sampler))


def calibration_union(model, requests: list[tuple[str, dict]]) -> tuple[int, list[str]]:
    """One trajectory set that covers every method of the grid on this model: max count, union of feature modules."""
    n, feats = 0, set()
    for name, overrides in requests:
        if name == FP_METHOD:
            continue
        k, modules = get_method(name).calibration_request(model, overrides)
        n, feats = max(n, int(k)), feats | set(modules or ())
    return n, sorted(feats)


def trajectory_spec(model, fp: str, cell: Cell, requests) -> dict:
    """Calibration trajectories: from the cell's calibration noise stream (bench.harness.seeds), never the sampling one."""
    n, feats = calibration_union(model, requests)
    return {"model": model.name, "fingerprint": fp, "sampler": model.sampler.describe(),
            "seed": calib_seed(cell.seed), "n": n, "features": feats,
            "batch_size": cell.batch_size}  # batch size changes float rounding


def shared_trajectories(model, fp: str, cell: Cell, cache: ArtifactCache, requests, device: str):
    from eda.trajectories import record_trajectories

    spec = trajectory_spec(model, fp, cell, requests)
    return cache.get("trajectories", spec, lambda: record_trajectories(
        model, spec["n"], spec["seed"], feature_modules=tuple(spec["features"]), batch_size=cell.batch_size,
        device=device))


def eps_trajectory_spec(model, fp: str, cell: Cell, k: int = EPS_MSE_SAMPLES) -> dict:
    """Held-out FP trajectories for the per-step error: their own noise stream, which no method calibrates on."""
    return {"model": model.name, "fingerprint": fp, "sampler": model.sampler.describe(),
            "seed": eps_seed(cell.seed), "n": k, "batch_size": cell.batch_size}


def shared_eps_trajectories(model, fp: str, cell: Cell, cache: ArtifactCache, device: str,
                            k: int = EPS_MSE_SAMPLES):
    from eda.trajectories import record_trajectories

    spec = eps_trajectory_spec(model, fp, cell, k)
    return cache.get("eps_trajectories", spec, lambda: record_trajectories(
        model, k, spec["seed"], batch_size=cell.batch_size, device=device))


def shared_fp_eps(model, fp: str, cell: Cell, cache: ArtifactCache, traj, device: str,
                  k: int = EPS_MSE_SAMPLES) -> torch.Tensor:
    """The FP half of the per-step noise-prediction error: the same for every method and bit width of a seed."""
    spec = eps_trajectory_spec(model, fp, cell, k)
    return cache.get("fp_eps", spec, lambda: _eps_on_trajectory(model, None, traj, cell.batch_size, device, k))


@torch.no_grad()
def _eps_on_trajectory(model, unet, traj, batch_size: int, device: str, k: int) -> torch.Tensor:
    """eps predictions of `unet` (None = FP) on the first k trajectories at every step: [S * k, ...] on CPU."""
    xs, ts = traj.xs[:, :k].float(), traj.ts
    S, n = xs.shape[:2]
    flat_x = xs.reshape(S * n, *xs.shape[2:])
    flat_t = ts.repeat_interleave(n)
    cond = getattr(traj, "cond", None)
    out = []
    for s in range(0, len(flat_x), batch_size):
        x, t = flat_x[s:s + batch_size].to(device), flat_t[s:s + batch_size].to(device)
        c = None if cond is None else {kk: v[:n].repeat(S, *[1] * (v.dim() - 1))[s:s + batch_size]
                                       for kk, v in cond.items()}
        out.append(model.eps_fn(unet, c)(x, t).cpu())
    return torch.cat(out)


class FPImages:
    """A seed's FP samples as images in [-1, 1], one .npy per sampling batch in the artifact cache, read back one
    batch at a time: neither the FP cell nor a quantized cell pairing its samples with them holds all of them.
    Decoded once (LDMs: the VAE runs once per FP sample, not once per cell).

    Stored as float16 (SHARD_DTYPE): 50k LSUN-sized samples take 20 GB of cache instead of 39 GB in float32. The
    rounding is at most 2^-11 of a value: a squared error of ~1e-7 per pixel against mse_vs_fp's ~1e-5 and up, and
    in the 8-bit images the Inception metrics see it moves a pixel by one level only where the float lies within
    5e-4 of a rounding boundary."""

    def __init__(self, path: Path):
        self.path = path
        meta = json.loads((path / "meta.json").read_text())
        self.n, self.batch_size, self.seconds = int(meta["n"]), int(meta["batch_size"]), float(meta["seconds"])

    def batches(self):
        """Yields (start index, images [B, C, H, W]) in sampling order."""
        for b, s in enumerate(range(0, self.n, self.batch_size)):
            yield s, torch.from_numpy(np.load(self.path / f"{b:06d}.npy", allow_pickle=False)).float()

def _fp_images_spec(model, fp: str, cell: Cell) -> dict:
    return {"model": model.name, "fingerprint": fp, "sampler": model.sampler.describe(),
            "seed": sample_seed(cell.seed), "n": cell.samples, "batch_size": cell.batch_size,
            "dtype": str(SHARD_DTYPE)}


def fp_images(model, fp: str, cell: Cell, cache: ArtifactCache, device: str) -> FPImages:
    spec = _fp_images_spec(model, fp, cell)

    def fill(folder: Path) -> None:
        t = time.time()
        for b, (_, x0) in enumerate(model.generate_batches(cell.samples, seed=spec["seed"],
                                                           batch_size=cell.batch_size, device=device)):
            np.save(folder / f"{b:06d}.npy", model.to_images(x0).to(SHARD_DTYPE).contiguous().numpy(),
                    allow_pickle=False)
            release_freed()  # bench/harness/heap.py: per-batch buffers would otherwise stay resident
        (folder / "meta.json").write_text(json.dumps({"n": cell.samples, "batch_size": cell.batch_size,
                                                      "seconds": time.time() - t}))

    return FPImages(cache.directory("fp_images", spec, fill))


def fp_feature_stats(model, fp: str, cell: Cell, cache: ArtifactCache, images: FPImages, device: str,
                     inception: bool, digits: bool) -> dict:
    """The FP samples' feature statistics that FID vs FP and digits-FID vs FP compare with (bench.metrics.stream
    FeatureMoments), computed once per seed and configuration and cached: a cell no longer extracts the FP samples'
    Inception features again (minutes on CPU)."""
    from bench.metrics.stream import FeatureMoments

    # the FP images' own spec (their shard dtype included: the statistics are computed from the shards)
    spec = {**_fp_images_spec(model, fp, cell), "inception": inception, "digits": digits, "mode": cell.fid_mode,
            "extractor": "fid-helper"}

    def compute():
        fm = FeatureMoments(inception=inception, digits=digits, device=device, mode=cell.fid_mode)
        for _, x in images.batches():
            fm.add(x)
            release_freed()
        return {k: list(v) for k, v in fm.stats().items()}

    return {k: tuple(v) for k, v in cache.get("fp_feature_stats", spec, compute).items()}


@torch.no_grad()
def eps_mse_per_step(model, qunet, traj, batch_size: int, device: str, k: int = EPS_MSE_SAMPLES,
                     fp_eps: torch.Tensor | None = None) -> list[float]:
    """Mean squared difference of the quantized and FP noise predictions on FP trajectories, per sampling step.
    `traj` must be held-out trajectories (`shared_eps_trajectories`), not the calibration set: on calibration
    trajectories the error would be in-sample. `fp_eps` (from `shared_fp_eps`) saves recomputing the FP half."""
    if fp_eps is None:
        fp_eps = _eps_on_trajectory(model, None, traj, batch_size, device, k)
    e_q = _eps_on_trajectory(model, qunet, traj, batch_size, device, k)
    S, n = traj.xs.shape[0], min(k, traj.xs.shape[1])
    return ((e_q - fp_eps) ** 2).flatten(1).mean(1).view(S, n).mean(1).tolist()


MSE_FLOOR = 1e-8  # per-sample MSE floor before the log: far below any quantized sample's (~1e-5 and up on digits)


def mse_vs_fp(images: torch.Tensor, fp_images: torch.Tensor) -> float:
    """Per-sample squared error against the FP image drawn from the same initial noise (both in [-1, 1]), averaged
    over samples as a geometric mean: exp(mean_i log MSE_i), i.e. the mean PSNR against FP in another unit.

    Paired sample by sample, so it measures fidelity to FP without the sampling noise of a distribution distance.
    The geometric mean, because float noise (another CPU, batch size or thread count) makes the odd sample's
    trajectory diverge, and an arithmetic mean is dominated by those few worst samples: for EDA-DM W4A8 on digits
    (128 samples), batch 32 instead of 64 moved the arithmetic mean by 6.2% and the geometric mean by 0.8%.
    A change that affects every sample moves it by its factor; 0 when the images are the FP images."""
    return _geo_mean([per_sample_mse(images, fp_images)])


def per_sample_mse(images: torch.Tensor, fp_images: torch.Tensor) -> np.ndarray:
    """Each sample's squared error against its FP image: a streaming cell keeps these (4 bytes per sample) and
    `_geo_mean` turns them into `mse_vs_fp`."""
    return ((images.float() - fp_images.float()) ** 2).flatten(1).mean(1).numpy()


def _geo_mean(per_sample: list) -> float:
    """exp(mean log MSE) over samples, each floored at MSE_FLOOR; 0 when no sample differs from FP (the FP cell, a
    cell equal to FP)."""
    per = torch.from_numpy(np.concatenate(per_sample)) if per_sample else torch.zeros(0)
    if not per.any():
        return 0.0
    return float(per.clamp_min(MSE_FLOOR).log().double().mean().exp())


def sample_grid_png(images: torch.Tensor, n: int = SAMPLE_GRID) -> bytes:
    """The first n images (in [-1, 1]) as one PNG grid."""
    from bench.metrics.images import grid_png

    return grid_png(images[:n])


class CellScoring:
    """A cell's metrics, fed batch by batch while it samples (bench.metrics.stream), so its memory does not grow
    with the sample count. FID vs FP and digits-FID vs FP compare with the FP samples' cached statistics
    (`fp_feature_stats`); for the FP cell both are 0 by definition."""

    def __init__(self, model, cell: Cell, device: str, described: dict | None = None):
        from bench.metrics.stream import SampleScorer

        self.model, self.cell, self.device = model, cell, device
        self.is_fp = cell.method == FP_METHOD
        self.wanted = tuple(m for m in cell.metrics if m not in HARNESS_METRICS)
        self.vs_fp = "fid_vs_fp" in cell.metrics and not self.is_fp
        self.digits_vs_fp = "digits_fid_vs_fp" in cell.metrics and not self.is_fp and model.dataset == "digits"
        self.scorer = None
        if self.wanted or self.vs_fp or self.digits_vs_fp:
            self.scorer = SampleScorer(model.dataset, self.wanted, device=device, split=reference_split(model),
                                       progress=False, mode=cell.fid_mode, stats_file=cell.reference_stats,
                                       described=described, vs_fp=self.vs_fp, digits_vs_fp=self.digits_vs_fp)
        self.prompts = None
        self.clip_sum, self.n = 0.0, 0
        if "clip" in cell.metrics:  # text-to-image models: CLIP score of each image against its prompt (EDA-DM Tab. 3)
            if model.prompts is None:
                raise BenchError(f"metric clip needs prompts, but model {model.name} has none; drop clip from the grid")
            self.prompts = model.prompts(cell.samples, sample_seed(cell.seed))

    def add(self, start: int, images: torch.Tensor) -> None:
        if self.scorer is not None:
            self.scorer.add(images)
        if self.prompts is not None:
            from bench.metrics.clip_score import clip_score

            got = clip_score(images, self.prompts[start:start + len(images)], device=self.device)
            self.clip_sum += float(got["clip"]) * len(images)
        self.n += len(images)

    def result(self, fp_stats: dict | None = None) -> dict[str, float]:
        scores = self.scorer.result(fp_stats) if self.scorer is not None else {}
        for k in ("fid_vs_fp", "digits_fid_vs_fp"):
            if k not in self.cell.metrics:
                scores.pop(k, None)
        if self.is_fp:
            scores.update({m: 0.0 for m in VS_FP if m in self.cell.metrics})
        if self.prompts is not None:
            scores["clip"] = self.clip_sum / self.n
        return scores


def reference_split(model) -> str | None:
    """The split a model's FID is measured against: its zoo card's (e.g. COCO val2014 for Stable Diffusion, as in
    the paper's Tab. 3), else None = bench.metrics.reference.default_split (held-out test for digits, train otherwise)."""
    return model.defaults.get("reference_split")


def require_reference(model, cell: Cell) -> None:
    """BenchError (evaluate's own line) when the reference data or the networks the cell's metrics need are missing:
    checked before sampling, which may take hours (bench.metrics.reference.reference_available reads no image)."""
    from bench.metrics.reference import reference_available

    wanted = tuple(m for m in cell.metrics if m not in HARNESS_METRICS)
    if "fid_vs_fp" in cell.metrics and cell.method != FP_METHOD:
        from bench.metrics.inception import weights_path

        weights_path("fid-helper")  # the Inception network, no reference set
    if wanted:
        ok, why = reference_available(model.dataset, split=reference_split(model), metrics=wanted, mode=cell.fid_mode,
                                      stats_file=cell.reference_stats)
        if not ok:
            raise BenchError(why)


def peak_memory_mb(device: str) -> float:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def base_row(cell: Cell, context: dict) -> dict:
    row = empty_row()
    row.update(grid=cell.grid, model=cell.model, method=cell.method, bits=cell.bits, w_bits=cell.w_bits,
               a_bits=cell.a_bits, seed=cell.seed, sample_seed=sample_seed(cell.seed), samples=cell.samples,
               batch_size=cell.batch_size,
               cell_key=cell.key,
               overrides=json.dumps(cell.overrides, sort_keys=True), run_id=context.get("run_id"),
               git_commit=context.get("git_commit"), host=host(), threads=torch.get_num_threads(),
               cpu_kernels=cpu_kernels(),
               versions=json.dumps(package_versions(), sort_keys=True), attempts=1)
    row["time"] = _now()
    return row


def _now():
    from datetime import datetime

    return datetime.now(UTC)


def stream_samples(model, cell: Cell, fp_set: FPImages, qunet, device: str, scoring: CellScoring | None,
                   context: dict, log: logging.Logger) -> dict:
    """Sample the cell batch by batch (the FP cell reads the cached FP samples instead) and hand each batch to the
    scorer, the per-sample MSE against the FP sample from the same noise, and the saved-samples file when
    `bench.run --save-samples` asked for one. Holds one batch of images, whatever the sample count.
    -> dict(mse_vs_fp, grid (the first SAMPLE_GRID images), sampling_seconds, scoring_seconds[, samples_file])."""
    writer = None
    if context.get("samples_dir"):  # bench.run --save-samples: re-scoring later needs no sampling
        from bench.harness.samples import SamplesWriter, samples_path

        writer = SamplesWriter(samples_path(context["samples_dir"], cell), cell.samples,
                               {**cell.to_dict(), "key": cell.key, "dataset": model.dataset,
                                "sampler": model.sampler.describe(), "git_commit": context.get("git_commit")})
    if qunet is None:
        source = fp_set.batches()
    else:
        source = ((s, model.to_images(x0)) for s, x0 in
                  model.generate_batches(cell.samples, seed=sample_seed(cell.seed), unet=qunet,
                                         batch_size=cell.batch_size, device=device))
    fp_batches = fp_set.batches() if qunet is not None else None
    per_mse: list[np.ndarray] = []
    grid: list[torch.Tensor] = []
    t_sample = t_score = 0.0
    try:
        t = time.time()
        for start, images in source:
            t_sample += time.time() - t
            t = time.time()
            if fp_batches is not None:
                fs, fp_b = next(fp_batches)
                if fs != start or len(fp_b) != len(images):
                    raise BenchError(f"cached FP samples {fp_set.path} do not line up with the cell's batches; "
                                     "delete that folder and they are recomputed")
                per_mse.append(per_sample_mse(images, fp_b))
            if scoring is not None:
                scoring.add(start, images)
            if writer is not None:
                writer.add(images)
            if sum(len(g) for g in grid) < SAMPLE_GRID:
                grid.append(images[:SAMPLE_GRID - sum(len(g) for g in grid)].clone())
            images = fp_b = None  # drop this batch before trimming
            release_freed()  # glibc keeps freed per-batch buffers resident otherwise (bench/harness/heap.py)
            t_score += time.time() - t
            t = time.time()
        out = {"grid": torch.cat(grid), "sampling_seconds": t_sample, "scoring_seconds": t_score,
               "mse_vs_fp": _geo_mean(per_mse)}
        if writer is not None:
            out["samples_file"] = str(writer.close())
            log.info("samples saved to %s", out["samples_file"])
        return out
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def run_cell(model, cell: Cell, cache: ArtifactCache, requests: list[tuple[str, dict]], context: dict,
             device: str = "cpu", log: logging.Logger | None = None) -> tuple[dict, bytes | None]:
    """Run one cell on a loaded FP model. Returns (row, PNG sample grid); exceptions propagate to the caller."""
    log = log or logging.getLogger("bench.harness.cell")
    t0 = time.time()
    model = with_sampler(model, cell.sampler)
    row = base_row(cell, context)
    row.update(dataset=model.dataset, sampler=model.sampler.describe(), steps=model.sampler.steps, device=str(device))
    require_reference(model, cell)  # before any sampling: a missing reference set fails in seconds
    fp = model_fingerprint(model)
    torch.manual_seed(cell.seed)

    fp_set = fp_images(model, fp, cell, cache, device)
    log.info("FP samples: %d from seed %d (%.1fs when computed)", cell.samples, cell.seed, fp_set.seconds)
    # Scoring starts before sampling: the reference statistics load now, so a bad reference fails in seconds.
    described: dict = {}
    scoring = CellScoring(model, cell, device, described) if cell.metrics else None
    info: dict[str, Any] = {}
    qunet = journal = None
    if cell.method == FP_METHOD:
        row.update(quant_seconds=0.0, sampling_seconds=fp_set.seconds, calib_size=0, eps_mse=0.0)
    else:
        traj = shared_trajectories(model, fp, cell, cache, requests, device)
        row["calib_seed"] = int(traj.seed)
        log.info("calibration trajectories: %s steps x %s samples from seed %d", *tuple(traj.xs.shape[:2]), traj.seed)
        t = time.time()
        method = get_method(cell.method)
        journal = cell_journal(cache, cell) if accepts_journal(method) else None
        res = method.quantize(model, cell.bits, traj, cell.seed, overrides=dict(cell.overrides), progress=False,
                              **({} if journal is None else {"journal": journal}))
        info = dict(res.info or {})
        qunet = res.unet
        row["quant_seconds"] = float(info.get("quant_seconds") or time.time() - t)
        restored = info.get("restored_units") or 0
        log.info("quantized with %s %s in %.1fs%s", cell.method, cell.bits, row["quant_seconds"],
                 f" ({restored} reconstructed units restored from the journal of an interrupted run)" if restored
                 else "")
        row["calib_size"] = info.get("calib_size")
        alloc = info.get("allocation")
        row["allocation"] = None if alloc is None else [int(a) for a in alloc]
    stream = stream_samples(model, cell, fp_set, qunet, device, scoring, context, log)
    row.update(sampling_seconds=stream["sampling_seconds"] if qunet is not None else fp_set.seconds,
               mse_vs_fp=stream["mse_vs_fp"])
    t = time.time()
    if stream.get("samples_file"):
        row["samples_file"] = stream["samples_file"]
    if qunet is not None:
        held_out = shared_eps_trajectories(model, fp, cell, cache, device)
        per_step = eps_mse_per_step(model, qunet, held_out, cell.batch_size, device,
                                    fp_eps=shared_fp_eps(model, fp, cell, cache, held_out, device))
        row["eps_mse_per_step"] = per_step
        row["eps_mse"] = float(sum(per_step) / len(per_step))
        log.info("noise-prediction MSE vs FP: %.4g", row["eps_mse"])
        row.update(int8_metrics(model, qunet, cell, device, log))  # integer-kernel latency (bench/harness/int8_cell.py)
    if scoring is not None:
        fp_stats = None
        if scoring.vs_fp or scoring.digits_vs_fp:
            fp_stats = fp_feature_stats(model, fp, cell, cache, fp_set, device, scoring.vs_fp, scoring.digits_vs_fp)
        scores = scoring.result(fp_stats)
        row["reference"] = described.get("reference")  # which reference set, extractor and FID mode
        for k, v in scores.items():
            if k in METRICS:
                row[k] = float(v)
        log.info("metrics: %s", {k: round(float(v), 4) for k, v in scores.items()})
    row["eval_seconds"] = stream["scoring_seconds"] + time.time() - t
    row["info"] = json.dumps({"config": info.get("config"), **{k: v for k, v in info.items() if k != "config"}},
                             default=str, sort_keys=True)
    row.update(status="ok", error="", total_seconds=time.time() - t0, peak_memory_mb=peak_memory_mb(device),
               time=_now())  # when the cell finished
    png = sample_grid_png(stream["grid"])
    if journal is not None:
        journal.clear()  # the cell is done; a failed one keeps its journal so that the retry resumes
    return row, png


def accepts_journal(method) -> bool:
    """Whether a method's quantize takes `journal=` (built-in methods do; a plugin may not)."""
    return "journal" in inspect.signature(method.quantize).parameters


def cell_journal(cache: ArtifactCache, cell: Cell):
    """The reconstruction journal of a cell (eda.journal): under the cache's local folder, keyed by the cell and
    bound to the code's commit, so a cell interrupted mid-reconstruction (killed worker, lost node, ended job)
    continues from its last finished unit when the grid resumes."""
    from eda.journal import Journal

    return Journal(cache.root / "journals" / cell.key, context=code_state())


def failed_row(cell: Cell, context: dict, error: str, attempts: int = 1, seconds: float = math.nan) -> dict:
    row = base_row(cell, context)
    row.update(status="failed", error=error, attempts=attempts, total_seconds=seconds)
    return row


def is_out_of_memory(e: BaseException) -> bool:
    """Host or GPU allocation failure: MemoryError, torch.OutOfMemoryError (CUDA), or the RuntimeError of torch's
    CPU allocator ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def format_error(e: BaseException) -> str:
    """One line for the store; the full traceback goes to the cell log. Out of memory and disk full say the fix."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    line = f"{type(e).__name__}: {msg}"
    short = line.rstrip(": ")[:200]
    if is_out_of_memory(e):
        return (f"out of memory in this cell ({short}); lower batch_size in the grid ([defaults] or the model's block) "
                "or run fewer workers per GPU/node (--gpus-per-worker 1, --max-workers)")
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return f"disk full on the worker ({short}); free space or move the artifact cache (--out, $EDA_BENCH_CACHE), then rerun"
    return line[:500]


def format_traceback(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))
