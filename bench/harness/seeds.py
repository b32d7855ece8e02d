"""Noise streams: one seed per purpose, derived from a cell's (or a CLI's) seed by a fixed rule.

Calibration, evaluation and the per-step noise-prediction error must never start from the same initial noise: an
evaluated sample that begins at a calibration trajectory's x_T measures the method on its own calibration data
(in-sample), and so does a per-step error computed on calibration trajectories. The rule, for a seed s in
0..MAX_SEED:

    sampling    s            the evaluated samples (FP and quantized alike: `bench.evaluate --seed s` reproduces
                             a cell's FP samples, and FP and quantized samples compare sample by sample)
    calibration s + 10_000   the FP trajectories every method calibrates on (`bench.quantize` uses the same)
    eps         s + 20_000   held-out FP trajectories for the per-step noise-prediction error (`eps_mse`)

Each stream seeds its own `torch.Generator` (bench.models.sampling.initial_noise), so distinct seeds give unrelated noise.
Seeds above MAX_SEED are refused so that the streams of one grid's cells never coincide either (seed 10_000's
sampling stream would be seed 0's calibration stream).

The official EDA-DM scripts seed calibration and FID sampling with the same `--seed` (`seed_everything`, then
`torch.manual_seed(args.seed)` in `sample_fid`), so their first calibration-sized batch of evaluation samples
starts from the calibration noise; this rule is a deliberate deviation (docs/fidelity.md).
"""

from __future__ import annotations

from bench.errors import UsageError

CALIB_OFFSET = 10_000
EPS_OFFSET = 20_000
MAX_SEED = CALIB_OFFSET - 1


def check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r} (larger seeds would reuse the "
                         "calibration or eps noise stream of another seed; see bench/harness/seeds.py)")
    return seed


def sample_seed(seed: int) -> int:
    """Seed of the evaluated samples."""
    return check_seed(seed)


def calib_seed(seed: int) -> int:
    """Seed of the FP calibration trajectories."""
    return check_seed(seed) + CALIB_OFFSET


def eps_seed(seed: int) -> int:
    """Seed of the held-out FP trajectories on which the per-step noise-prediction error is measured."""
    return check_seed(seed) + EPS_OFFSET
