"""The sampler: published step spacings, agreement with diffusers' DDIMScheduler, determinism, hooks."""

import numpy as np
import pytest
import torch

from bench.errors import UsageError
from bench.models.sampling import SamplerConfig, sample, sample_batch, timesteps
from bench.models.schedule import alphas_cumprod_for
from tests.conftest import make_tiny_unet


@pytest.fixture(scope="module")
def tiny_unet():
    return make_tiny_unet(width=16)


def eps_of(unet):
    return lambda x, t: unet(x, t).sample


def test_quad_timesteps_follow_the_published_formula():
    # DDIM repository / Q-Diffusion / EDA-DM CIFAR-10: seq = [int(s) for s in linspace(0, sqrt(0.8 T), n) ** 2]
    expected = [int(s) for s in list(np.linspace(0, np.sqrt(1000 * 0.8), 100) ** 2)]
    got = timesteps(SamplerConfig(steps=100, skip="quad"), 1000)
    assert got == expected
    assert got[:4] == [0, 0, 0, 0] and got[-1] == 800  # the quirk the papers run with


def test_uniform_timesteps():
    assert timesteps(SamplerConfig(steps=100, skip="uniform"), 1000) == list(range(0, 1000, 10))
    assert timesteps(SamplerConfig(kind="ddpm", steps=1000), 1000) == list(range(1000))


def test_uniform_ddim_matches_diffusers_scheduler(tiny_unet):
    from diffusers import DDIMScheduler

    steps = 20
    acp = alphas_cumprod_for("linear")
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample_batch(eps_of(tiny_unet), x_T, acp, SamplerConfig(steps=steps, eta=0.0, skip="uniform"))

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(tiny_unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


@pytest.mark.parametrize("cfg", [SamplerConfig(steps=10), SamplerConfig(steps=10, eta=1.0, skip="uniform"),
                                 SamplerConfig(kind="ddpm", steps=10, skip="uniform")])
def test_sampling_shape_and_determinism(tiny_unet, cfg):
    acp = alphas_cumprod_for("linear")
    a = sample(eps_of(tiny_unet), 5, (1, 8, 8), acp, cfg, seed=3, batch_size=2)
    b = sample(eps_of(tiny_unet), 5, (1, 8, 8), acp, cfg, seed=3, batch_size=2)
    c = sample(eps_of(tiny_unet), 5, (1, 8, 8), acp, cfg, seed=4, batch_size=2)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_eta0_is_independent_of_batch_size(tiny_unet):
    acp = alphas_cumprod_for("linear")
    cfg = SamplerConfig(steps=8)
    a = sample(eps_of(tiny_unet), 6, (1, 8, 8), acp, cfg, seed=0, batch_size=6)
    b = sample(eps_of(tiny_unet), 6, (1, 8, 8), acp, cfg, seed=0, batch_size=4)
    assert torch.allclose(a, b, atol=1e-4)


def test_hooks_see_every_step_with_offsets(tiny_unet):
    acp = alphas_cumprod_for("linear")
    cfg = SamplerConfig(steps=7, skip="uniform")
    seen = []
    sample(eps_of(tiny_unet), 5, (1, 8, 8), acp, cfg, seed=0, batch_size=3,
           hooks=[lambda r: seen.append((r.index, r.t, r.offset, r.x_t.shape[0], r.eps.shape))])
    assert [s[0] for s in seen] == list(range(7)) * 2
    assert [s[1] for s in seen[:7]] == sorted(timesteps(cfg), reverse=True)  # noisiest first
    assert {s[2] for s in seen} == {0, 3} and {s[3] for s in seen} == {3, 2}


def test_bad_sampler_settings_are_usage_errors():
    with pytest.raises(UsageError, match="skip type"):
        SamplerConfig(skip="cubic")
    with pytest.raises(UsageError, match="sampler kind"):
        SamplerConfig(kind="euler")


@pytest.mark.parametrize("n,shape,batch", [(1000, (1, 16, 16), 256), (17, (1, 5, 5), 16), (9, (3, 8, 8), 4),
                                           (7, (2, 3), 3), (5, (1, 1, 3), 2), (40, (3, 256, 256), 16)])
def test_batch_noise_is_the_one_draw_sliced(n, shape, batch):
    # A streaming cell draws x_T one batch at a time; its samples must be those of the one-draw noise that every
    # committed result was sampled from, for chunkable shapes (the generator path) and tiny ones (the fallback).
    from bench.models.sampling import _noise_chunks, initial_noise

    chunks = list(_noise_chunks(n, shape, seed=7, batch_size=batch))
    assert [len(c) for c in chunks] == [min(batch, n - s) for s in range(0, n, batch)]
    assert torch.equal(torch.cat(chunks), initial_noise(n, shape, seed=7))


def test_sample_batches_follow_the_one_draw_noise_and_per_batch_generators(tiny_unet):
    # What every committed result was sampled with: x_T drawn at once, batch b's step noise from seed*1_000_003 + b.
    from bench.models.sampling import initial_noise, sample_batches

    cfg, acp = SamplerConfig(kind="ddim", steps=3, eta=0.5), alphas_cumprod_for("linear")
    x_T = initial_noise(5, (1, 8, 8), seed=3)
    expected = [sample_batch(eps_of(tiny_unet), x_T[s:s + 2], acp, cfg, offset=s,
                             generator=torch.Generator().manual_seed(3 * 1_000_003 + b))
                for b, s in enumerate(range(0, 5, 2))]
    parts = list(sample_batches(eps_of(tiny_unet), 5, (1, 8, 8), acp, cfg, seed=3, batch_size=2))
    assert [s for s, _ in parts] == [0, 2, 4]
    for (_, got), want in zip(parts, expected):
        assert torch.equal(got, want)
    assert torch.equal(sample(eps_of(tiny_unet), 5, (1, 8, 8), acp, cfg, seed=3, batch_size=2),
                       torch.cat(expected))
