"""The model type: `DiffusionModel`, a UNet with its noise schedule and the official sampler settings.

Only the UNet is quantized. Anything around it (a VAE decoder, a text encoder, classifier-free guidance) lives in
`eps_fn` / `decode`, which stay full precision. Models are looked up by name in bench.models.registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.models.sampling import SamplerConfig
from eda.guidance import guided_inputs


@dataclass
class DiffusionModel:
    """Everything needed to sample from, calibrate and evaluate one diffusion model."""

    name: str
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor
    sampler: SamplerConfig
    sample_shape: tuple[int, ...]  # shape of x_t for one sample (latent shape for LDMs)
    dataset: str  # reference data for metrics, e.g. "digits"
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images in [-1, 1]
    # Conditioning for calibration and sampling: a function (n, seed) -> dict of extra UNet kwargs per sample.
    conditioning: Callable[[int, int], dict[str, torch.Tensor]] | None = None
    guidance_scale: float = 1.0
    defaults: dict[str, Any] = field(default_factory=dict)  # per-task method defaults (e.g. TDAC lambda, r)
    source: str = ""  # where the weights came from
    # Text-to-image models: the prompt of each sample, (n, seed) -> list[str], in the order `conditioning` encodes
    # them (the CLIP score compares each image with its prompt).
    prompts: Callable[[int, int], list[str]] | None = None
    # What the UNet predicts: "epsilon" (every built-in model), "v_prediction" or "sample" (a diffusers scheduler
    # config's prediction_type). `eps_fn` returns the raw output; the sampler converts it
    # (bench.models.sampling.model_output_to_x0_eps).
    prediction_type: str = "epsilon"

    def unet_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None):
        """The batch the UNet actually sees for (x_t, t, cond) -> (x, t, kwargs): [uncond; cond] when
        guidance_scale != 1 and `cond` carries `uncond_*` keys (see guided_inputs), else the cond branch only."""
        return guided_inputs(x, t, cond, guidance=self.guidance_scale != 1.0)

    def eps_fn(self, unet: torch.nn.Module | None = None, cond: dict[str, torch.Tensor] | None = None):
        """The sampler's view of `unet` (default: this model's FP UNet): (x_t, t) -> the network's prediction (noise,
        or v / x0 as `prediction_type` says), with
        classifier-free guidance eps_u + s (eps_c - eps_u) when `cond` carries `uncond_*` keys (see unet_inputs)."""
        net = self.unet if unet is None else unet

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xin, tin, kwargs = self.unet_inputs(x, t, cond)
            out = net(xin, tin, **kwargs)
            out = out.sample if hasattr(out, "sample") else out
            out = out[:, : x.shape[1]]  # learned-sigma UNets output 2C channels; the sampler uses eps only
            if xin.shape[0] != x.shape[0]:
                e_u, e_c = out.chunk(2)
                out = e_u + self.guidance_scale * (e_c - e_u)
            return out

        return eps

    def generate(self, n: int, seed: int = 0, unet: torch.nn.Module | None = None,
                 sampler: SamplerConfig | None = None, batch_size: int = 256, device: str | torch.device = "cpu",
                 hooks=(), progress: bool = False) -> torch.Tensor:
        """Run the sampler for n samples from `seed` with `unet` (default: the FP UNet); returns x_0 on CPU
        (latents for LDMs: pass them through `to_images`). Conditioning, if any, comes from
        `self.conditioning(n, seed)` and is sliced per batch, so FP and quantized runs see the same inputs."""
        outs = [x0 for _, x0 in self.generate_batches(n, seed, unet, sampler, batch_size, device, hooks, progress)]
        return torch.cat(outs) if outs else torch.empty((0, *self.sample_shape))

    def generate_batches(self, n: int, seed: int = 0, unet: torch.nn.Module | None = None,
                         sampler: SamplerConfig | None = None, batch_size: int = 256,
                         device: str | torch.device = "cpu", hooks=(), progress: bool = False):
        """`generate`, one batch at a time: yields (start index, x_0 batch on CPU) with the values `generate`
        returns, so a caller that consumes each batch holds one batch of samples whatever n is."""
        from bench.models.sampling import sample_batches

        cond = self.conditioning(n, seed) if self.conditioning is not None else None

        def per_batch(start: int, stop: int):
            return self.eps_fn(unet, None if cond is None else {k: v[start:stop] for k, v in cond.items()})

        yield from sample_batches(per_batch, n, self.sample_shape, self.alphas_cumprod, sampler or self.sampler,
                                  seed=seed, batch_size=batch_size, device=device, hooks=hooks, progress=progress,
                                  per_batch=True, prediction_type=self.prediction_type)

    def timesteps(self, sampler: SamplerConfig | None = None) -> list[int]:
        """The training time steps the sampler visits (default: this model's sampler), as `generate` runs them."""
        from bench.models.sampling import timesteps

        return timesteps(sampler or self.sampler, len(self.alphas_cumprod))

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1] (decodes latents for LDMs)."""
        return (self.decode(x0) if self.decode is not None else x0).clamp(-1, 1)
