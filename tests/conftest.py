"""Shared tiny-model fixtures (seconds on CPU): the one tiny UNet, tiny models around it, tiny method budgets.
Additive: other workstreams may append their own fixtures."""

import pytest
import torch


def make_tiny_unet(seed: int = 0, width: int = 32, channels: int = 1):
    """The tiny test UNet (every test's UNet2DModel is this one): resnets, self-attention in encoder/decoder/mid block
    and decoder skip concatenations, `channels`x8x8 inputs. Block widths (width, 2 width); GroupNorm groups
    min(8, width / 2). width 32 (default) for the quantization tests, 8 for the method and harness tests that run
    many quantizations; channels 3 for an RGB pixel model."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=min(8, width // 2), attention_head_dim=8,
    ).eval()


def make_tiny_cond_unet(seed: int = 0):
    """UNet2DConditionModel with cross-attention (Transformer2DModel / BasicTransformerBlock), 16-dim context."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_cond_unet():
    return make_tiny_cond_unet()


def make_tiny_model(cond: bool = False, steps: int = 5, seed: int = 0, width: int = 32):
    """A DiffusionModel around a tiny UNet with a short DDIM sampler (conditional: per-sample random context)."""
    from bench.models.model import DiffusionModel
    from bench.models.sampling import SamplerConfig
    from bench.models.schedule import alphas_cumprod_for

    unet = make_tiny_cond_unet(seed) if cond else make_tiny_unet(seed, width)
    conditioning = None
    if cond:
        def conditioning(n, seed):
            g = torch.Generator().manual_seed(seed + 7)
            return {"encoder_hidden_states": torch.randn(n, 3, 16, generator=g)}
    c = unet.config.in_channels
    return DiffusionModel(name="tiny-cond" if cond else "tiny", unet=unet, alphas_cumprod=alphas_cumprod_for(),
                          sampler=SamplerConfig(steps=steps), sample_shape=(c, 8, 8), dataset="digits",
                          conditioning=conditioning)


# A tiny budget for any method (seconds on CPU): every knob of this table the method has takes its value.
TINY_KNOBS = {"n_samples": 8, "init_batch": 8, "iters": 2, "iters_a": 2, "batch_size": 4, "cali_st": 2, "cali_n": 4}


def tiny(name: str, **extra) -> dict:
    """Overrides giving method `name` a tiny budget: TINY_KNOBS for the knobs it has, then `extra`."""
    from eda.registry import get_method

    knobs = set(get_method(name).knob_names())
    return {**{k: v for k, v in TINY_KNOBS.items() if k in knobs}, **extra}


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def tiny_cond_model():
    return make_tiny_model(cond=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny diffusers UNet directory with a bench.json (loadable by bench.models.load_model, 4-step DDIM)."""
    import json

    d = tmp_path_factory.mktemp("tiny-model")
    make_tiny_unet(width=8).save_pretrained(d / "unet")
    (d / "bench.json").write_text(json.dumps({"name": "tiny", "dataset": "digits",
                                              "sampler": {"kind": "ddim", "steps": 4, "eta": 0.0, "skip": "uniform"}}))
    return d
