"""Noise schedules (beta_t) of the DDPM family, as the CIFAR-10 papers, CompVis LDM and diffusers define them."""

from __future__ import annotations

import math

import torch

from bench.errors import UsageError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """The Glide / improved-DDPM cosine schedule as diffusers' schedulers/scheduling_ddim.py:betas_for_alpha_bar
    (alpha_transform_type="cosine") computes it: beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]


def betas_for(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
              dtype: torch.dtype = torch.float64):
    """'linear' (DDPM, Ho et al. 2020), 'scaled_linear' (CompVis LDM: linear in sqrt(beta)) or 'squaredcos_cap_v2'
    (Glide cosine), float64 unless `dtype` says otherwise (diffusers computes them in float32)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2
    if schedule == "squaredcos_cap_v2":
        return torch.tensor(_cosine_betas(num_train_timesteps), dtype=dtype)
    raise UsageError(f"unknown beta schedule {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)} "
                     "(or trained_betas in a scheduler config)")


def alphas_cumprod_for(schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                       beta_end: float = 0.02) -> torch.Tensor:
    return torch.cumprod(1.0 - betas_for(schedule, num_train_timesteps, beta_start, beta_end), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1, as diffusers' schedulers/scheduling_ddim.py:rescale_zero_terminal_snr: shift
    and scale sqrt(alpha_bar) so the last time step has alpha_bar = 0 and the first keeps its value."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def scheduler_betas(config: dict) -> torch.Tensor:
    """The betas a diffusers scheduler builds from its scheduler_config.json (DDIMScheduler.__init__ and its
    siblings): trained_betas when given, else beta_schedule over num_train_timesteps from beta_start to beta_end,
    in float32 exactly as diffusers computes them, optionally rescaled to zero terminal SNR."""
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    else:
        betas = betas_for(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                          float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)),
                          dtype=torch.float32)
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas
