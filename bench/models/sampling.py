"""Our own DDIM / DDPM sampling loop with per-step hooks.

The CIFAR-10 papers (DDIM, Q-Diffusion, EDA-DM) sample with the DDIM repository's `generalized_steps`: 100 steps,
eta 0 and *quadratic* time-step spacing. diffusers' DDIMScheduler assumes even spacing and cannot produce the quad
sequence, so the loop lives here. Calibration records trajectories through the same loop that
evaluation samples with, so what is calibrated is exactly what is evaluated.

`eps_fn(x_t, t) -> eps` hides the network: an unconditional UNet, a class-conditional one, or classifier-free
guidance all present the same interface to the sampler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from bench.errors import UsageError
from eda.hooks import StepRecord  # the hook record calibration is written against

# INFO lines are a cell's live progress in the harness (bench.harness.worker.cell_logging); silent elsewhere
log = logging.getLogger(__name__)

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# What the network predicts (diffusers' scheduler config `prediction_type`): the sampler turns each into (x0, eps).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Time-step spacings: the DDIM repository's quad and uniform (= diffusers' "leading"), and diffusers' "trailing" and
# "linspace" (schedulers/scheduling_ddim.py:DDIMScheduler.set_timesteps).
SKIP_TYPES = ("quad", "uniform", "trailing", "linspace")


@dataclass(frozen=True)
class SamplerConfig:
    """kind: 'ddim' (generalized steps; eta=1 is DDPM-like), 'ddpm' (ancestral, posterior variance) or 'plms'
    (CompVis' pseudo linear multi-step sampler, the Stable Diffusion v1 default; eta is ignored).

    Defaults are the CIFAR-10 setting of DDIM / Q-Diffusion / EDA-DM: `--timesteps 100 --eta 0 --skip_type quad`.
    CompVis' DDIMSampler / PLMSSampler (the LDM and SD scripts) use `skip="uniform", offset=1,
    set_alpha_to_one=False`: time steps range(0, T, T // steps) + 1 (e.g. 1..996 for 200 steps) and the last step
    lands on alpha_bar_0 instead of 1 (`alphas_prev[0] = alphas_cumprod[0]` in `make_ddim_sampling_parameters`).
    """

    kind: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    skip: str = "quad"
    offset: int = 0  # added to every time step (CompVis `make_ddim_timesteps` adds 1)
    set_alpha_to_one: bool = True  # alpha_bar before the first time step: 1 (DDIM repo) or alpha_bar_0 (CompVis)
    # diffusers' clip_sample / clip_sample_range: clamp the predicted x0 to [-clip_x0, clip_x0] (DDIM and DDPM
    # steps; 0 = no clamp, the DDIM repository and CompVis). PLMS never clips (neither CompVis nor diffusers' PNDM).
    clip_x0: float = 0.0

    def __post_init__(self):
        if self.kind not in ("ddim", "ddpm", "plms"):
            raise UsageError(f"unknown sampler kind {self.kind!r}; expected 'ddim', 'ddpm' or 'plms'")
        if self.skip not in SKIP_TYPES:
            raise UsageError(f"unknown skip type {self.skip!r}; expected one of {', '.join(SKIP_TYPES)}")
        if self.clip_x0 < 0:
            raise UsageError(f"sampler clip_x0 must be >= 0 (0 = no clipping), got {self.clip_x0}")
        if self.steps < 1:
            raise UsageError(f"sampler steps must be >= 1, got {self.steps}")
        if self.offset < 0:
            raise UsageError(f"sampler offset must be >= 0, got {self.offset}")

    def describe(self) -> str:
        s = f"{self.kind}{self.steps}-eta{self.eta:g}-{self.skip}"
        s += (f"+{self.offset}" if self.offset else "") + ("" if self.set_alpha_to_one else "-a0")
        return s + (f"-clip{self.clip_x0:g}" if self.clip_x0 else "")


def timesteps(cfg: SamplerConfig, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending list of training time steps visited, as in the DDIM repository's `generalized_steps` callers.

    uniform: range(0, T, T // steps). quad: int(s) for s in linspace(0, sqrt(0.8 T), steps)**2, which covers
    0..0.8T and repeats small values (0 appears four times for T=1000, steps=100); we keep that quirk.
    trailing: round(arange(T, 0, -T / steps)) - 1; linspace: round(linspace(0, T - 1, steps)), as diffusers'
    schedulers/scheduling_ddim.py:DDIMScheduler.set_timesteps ("leading" + steps_offset is uniform + offset).
    """
    T, n = num_train_timesteps, cfg.steps
    if cfg.kind == "ddpm" and n >= T:
        seq = list(range(T))
    elif cfg.skip == "uniform":
        skip = max(T // n, 1)
        seq = list(range(0, T, skip))[:n]
    elif cfg.skip == "trailing":
        seq = sorted(int(t) - 1 for t in np.round(np.arange(T, 0, -T / n)))
    elif cfg.skip == "linspace":
        seq = [int(t) for t in np.linspace(0, T - 1, n).round()]
    else:
        seq = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), n) ** 2]
    if cfg.offset:
        seq = [t + cfg.offset for t in seq]
        if seq[-1] >= T:
            raise UsageError(f"sampler offset {cfg.offset} pushes time step {seq[-1]} past T-1 = {T - 1}")
    return seq


def previous_timesteps(cfg: SamplerConfig, seq: list[int], num_train_timesteps: int) -> list[int]:
    """The time step each step of `seq` lands on (-1: past the start, alpha_bar = 1 or alpha_bar_0).

    Normally the previous element of the sequence. diffusers' DDIMScheduler.step (schedulers/scheduling_ddim.py)
    instead always lands on t - T // steps; for "trailing" and "linspace" spacings that can differ from the next
    time step the model is evaluated at (e.g. linspace, T=1000, 10 steps: 999 -> 899, then the model sees 888).
    A model folder's scheduler config asks for diffusers' sampler, so DDIM with those spacings follows diffusers.
    """
    if cfg.kind == "ddim" and cfg.skip in ("trailing", "linspace"):
        ratio = num_train_timesteps // cfg.steps
        return [t - ratio if t - ratio >= 0 else -1 for t in seq]
    return [-1] + seq[:-1]


def model_output_to_x0_eps(out: torch.Tensor, x: torch.Tensor, at: float, prediction_type: str = "epsilon"):
    """(x0, eps) from the network's output at alpha_bar `at`, as diffusers' DDIMScheduler.step converts them
    (schedulers/scheduling_ddim.py, step 3): epsilon: x0 = (x - sqrt(1-a) eps) / sqrt(a); v_prediction:
    x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x; sample: eps = (x - sqrt(a) x0) / sqrt(1-a).
    v is converted directly, never through eps: (x - sqrt(1-a) eps) / sqrt(a) loses precision where a is small."""
    if prediction_type == "epsilon":
        return (x - out * (1 - at) ** 0.5) / at**0.5, out
    if prediction_type == "v_prediction":
        return at**0.5 * x - (1 - at) ** 0.5 * out, at**0.5 * out + (1 - at) ** 0.5 * x
    if prediction_type == "sample":
        return out, (x - at**0.5 * out) / (1 - at) ** 0.5
    raise UsageError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def _alpha(alphas_cumprod: torch.Tensor, t: int, one_at_start: bool = True) -> float:
    """alpha_bar at t, with alpha_bar(-1) = 1 (the DDIM repository pads beta with a leading 0), or alpha_bar_0
    when `one_at_start` is False (CompVis samplers)."""
    if t < 0:
        return 1.0 if one_at_start else float(alphas_cumprod[0])
    return float(alphas_cumprod[t])


@torch.no_grad()
def sample_batch(eps_fn: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, cfg: SamplerConfig,
                 generator: torch.Generator | None = None, hooks: Iterable[Callable[[StepRecord], None]] = (),
                 offset: int = 0, prediction_type: str = "epsilon"):
    """Denoise one batch from x_T to x_0. Each hook is called once per step with a StepRecord (its `eps` is the
    network's output as it is, whatever `prediction_type` says it predicts: what calibration reconstructs)."""
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unknown prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    hooks = list(hooks)
    seq = timesteps(cfg, len(alphas_cumprod))
    seq_next = previous_timesteps(cfg, seq, len(alphas_cumprod))
    x = x_T
    old_eps: list[torch.Tensor] = []  # PLMS history of eps, newest last
    for index, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next))):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = eps_fn(x, t)
        for h in hooks:
            h(StepRecord(index, i, x, out, offset))
        at, at_next = _alpha(alphas_cumprod, i), _alpha(alphas_cumprod, j, cfg.set_alpha_to_one)
        x0, eps = model_output_to_x0_eps(out, x, at, prediction_type)
        if cfg.kind == "plms":
            x = _plms_step(eps_fn, x, eps, old_eps, i, j, at, at_next, alphas_cumprod, prediction_type)
            continue
        if cfg.clip_x0:  # diffusers' clip_sample: x0 only; eps stays the model's (use_clipped_model_output=False)
            x0 = x0.clamp(-cfg.clip_x0, cfg.clip_x0)
        if cfg.kind == "ddim":
            # DDIM Eq. 12 with sigma from Eq. 16 (generalized_steps in the DDIM repository).
            c1 = cfg.eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)) ** 0.5
            c2 = ((1 - at_next) - c1**2) ** 0.5
            noise = _randn_like(x, generator) if c1 > 0 else 0.0
            x = at_next**0.5 * x0 + c1 * noise + c2 * eps
        else:
            # DDPM ancestral step on the (possibly respaced) chain: posterior mean and variance beta~_t.
            beta = 1 - at / at_next
            mean = (at_next**0.5 * beta / (1 - at)) * x0 + ((1 - beta) ** 0.5 * (1 - at_next) / (1 - at)) * x
            var = beta * (1 - at_next) / (1 - at)
            x = mean + (var**0.5 * _randn_like(x, generator) if j >= 0 else 0.0)
    return x


def _ddim0(x: torch.Tensor, eps: torch.Tensor, at: float, at_next: float) -> torch.Tensor:
    """Deterministic (eta = 0) DDIM step from alpha_bar `at` to `at_next`."""
    x0 = (x - eps * (1 - at) ** 0.5) / at**0.5
    return at_next**0.5 * x0 + (1 - at_next) ** 0.5 * eps


def _plms_step(eps_fn: EpsFn, x: torch.Tensor, eps: torch.Tensor, old_eps: list[torch.Tensor], i: int, j: int,
               at: float, at_next: float, alphas_cumprod: torch.Tensor | None = None,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """One step of CompVis' PLMS (Liu et al. 2022, PNDM): Adams-Bashforth combinations of the last 4 eps, and a
    pseudo improved-Euler (Heun) first step that costs one extra model call at the next time step. A v- or
    x0-predicting network's outputs are turned into eps at their own time step first, as Stability's SD 2 PLMSSampler
    does (ldm/models/diffusion/plms.py: predict_eps_from_z_and_v)."""
    if not old_eps:
        t_next = torch.full((x.shape[0],), j if j >= 0 else i, dtype=torch.long, device=x.device)
        x_next = _ddim0(x, eps, at, at_next)
        eps_next = eps_fn(x_next, t_next)
        if prediction_type != "epsilon":
            a_next = _alpha(alphas_cumprod, j if j >= 0 else i)
            eps_next = model_output_to_x0_eps(eps_next, x_next, a_next, prediction_type)[1]
        eps_prime = (eps + eps_next) / 2
    elif len(old_eps) == 1:
        eps_prime = (3 * eps - old_eps[-1]) / 2
    elif len(old_eps) == 2:
        eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    else:
        eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    old_eps.append(eps)
    del old_eps[:-3]
    return _ddim0(x, eps_prime, at, at_next)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for n samples from one seed, drawn on CPU so every device and batch size sees the same noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


def _noise_chunks(n: int, shape: tuple[int, ...], seed: int, batch_size: int):
    """x_T of `initial_noise(n, shape, seed)`, batch by batch, without holding all of it (50k LSUN samples are
    39 GB of float32 noise). One generator advanced chunk by chunk gives the same values as one draw when every
    chunk but the last has a multiple of 16 elements and the last has at least 16: CPU `randn` draws one uniform
    per element and pairs them by Box-Muller within blocks of 16, redrawing the last 16 when the size is not a
    multiple of 16 (ATen's normal_fill; tests/test_sampling.py pins it). Otherwise (tiny shapes only) the noise is
    drawn at once and sliced."""
    per = int(np.prod(shape)) if shape else 1
    last = n - (max(n - 1, 0) // batch_size) * batch_size
    if n and (batch_size * per) % 16 == 0 and last * per >= 16:
        g = torch.Generator().manual_seed(seed)
        for s in range(0, n, batch_size):
            yield torch.randn((min(batch_size, n - s), *shape), generator=g)
    else:
        x_T = initial_noise(n, shape, seed)
        for s in range(0, n, batch_size):
            yield x_T[s:s + batch_size]


@torch.no_grad()
def sample(eps_fn: EpsFn | Callable[[int, int], EpsFn], n: int, shape: tuple[int, ...], alphas_cumprod: torch.Tensor,
           cfg: SamplerConfig, seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
           hooks: Iterable[Callable[[StepRecord], None]] = (), progress: bool = False,
           per_batch: bool = False, prediction_type: str = "epsilon") -> torch.Tensor:
    """Sample n images (returned on CPU). Deterministic for a seed, independent of batch size for eta = 0.

    With per_batch=True, `eps_fn(start, stop)` is called once per batch and returns that batch's eps function
    (how per-sample conditioning is sliced into batches). `sample_batches` yields the same batches one at a time.
    """
    outs = [xb for _, xb in sample_batches(eps_fn, n, shape, alphas_cumprod, cfg, seed, batch_size, device, hooks,
                                           progress, per_batch, prediction_type)]
    return torch.cat(outs) if outs else torch.empty((0, *shape))


@torch.no_grad()
def sample_batches(eps_fn: EpsFn | Callable[[int, int], EpsFn], n: int, shape: tuple[int, ...],
                   alphas_cumprod: torch.Tensor, cfg: SamplerConfig, seed: int = 0, batch_size: int = 256,
                   device: str | torch.device = "cpu", hooks: Iterable[Callable[[StepRecord], None]] = (),
                   progress: bool = False, per_batch: bool = False, prediction_type: str = "epsilon"):
    """`sample`, one batch at a time: yields (start index, x_0 of samples start.. on CPU), so a caller that
    consumes each batch (a streaming harness cell) holds one batch of samples, whatever n is. Only the initial
    noise of the current batch is drawn (see `_noise_chunks`), with the values of `initial_noise(n, ...)` sliced."""
    noise = _noise_chunks(n, shape, seed, batch_size)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling {cfg.describe()}", unit="batch")
    n_batches = -(-n // batch_size)
    for b, s in enumerate(starts):
        log.info("sampling batch %d/%d (%s)", b + 1, n_batches, cfg.describe())
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)  # per-step noise for eta > 0 / ddpm
        xb = next(noise).to(device)
        fn = eps_fn(s, s + len(xb)) if per_batch else eps_fn
        yield s, sample_batch(fn, xb, alphas_cumprod, cfg, generator=gen, hooks=hooks, offset=s,
                              prediction_type=prediction_type).cpu()
