"""Noise schedules (beta_t) of the DDPM family, as the CIFAR-10 papers and CompVis LDM define them."""

from __future__ import annotations

import torch


def betas_for(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """'linear' (DDPM, Ho et al. 2020) or 'scaled_linear' (CompVis LDM: linear in sqrt(beta)), float64."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {schedule!r}; expected 'linear' or 'scaled_linear'")


def alphas_cumprod_for(schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                       beta_end: float = 0.02) -> torch.Tensor:
    return torch.cumprod(1.0 - betas_for(schedule, num_train_timesteps, beta_start, beta_end), dim=0)
