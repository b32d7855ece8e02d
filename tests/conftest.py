"""Shared tiny-model fixtures (seconds on CPU). Additive: other workstreams may append their own fixtures."""

import pytest
import torch


def make_tiny_unet(seed: int = 0):
    """UNet2DModel with resnets, self-attention in encoder/decoder/mid block and decoder skip concatenations."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
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


def make_tiny_model(cond: bool = False, steps: int = 5):
    """A DiffusionModel around a tiny UNet with a short DDIM sampler (conditional: per-sample random context)."""
    from bench.models import DiffusionModel
    from bench.models.sampling import SamplerConfig
    from bench.models.schedule import alphas_cumprod_for

    unet = make_tiny_cond_unet() if cond else make_tiny_unet()
    conditioning = None
    if cond:
        def conditioning(n, seed):
            g = torch.Generator().manual_seed(seed + 7)
            return {"encoder_hidden_states": torch.randn(n, 3, 16, generator=g)}
    c = unet.config.in_channels
    return DiffusionModel(name="tiny-cond" if cond else "tiny", unet=unet, alphas_cumprod=alphas_cumprod_for(),
                          sampler=SamplerConfig(steps=steps), sample_shape=(c, 8, 8), dataset="digits",
                          conditioning=conditioning)


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

    from tests.test_methods import tiny_unet

    d = tmp_path_factory.mktemp("tiny-model")
    tiny_unet().save_pretrained(d / "unet")
    (d / "bench.json").write_text(json.dumps({"name": "tiny", "dataset": "digits",
                                              "sampler": {"kind": "ddim", "steps": 4, "eta": 0.0, "skip": "uniform"}}))
    return d
