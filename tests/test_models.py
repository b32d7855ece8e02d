"""Model registry: loading by name or directory, and one clear error line for bad input."""

import pytest
import torch

from bench.metrics.data import load_digits_split, to_uint8_rgb
from bench.errors import BenchError, UsageError
from bench.models import available_models, load_model
from tests.conftest import make_tiny_unet


@pytest.fixture()
def saved_tiny_unet(tmp_path):
    unet = make_tiny_unet(width=16)
    unet.save_pretrained(tmp_path / "m" / "unet")
    return tmp_path / "m", unet


def test_embedded_default_is_registered():
    assert "digits-ddpm" in available_models()


def test_unknown_model_is_one_clear_line():
    with pytest.raises(UsageError) as e:
        load_model("no-such-model")
    msg = str(e.value)
    assert "unknown model 'no-such-model'" in msg and "digits-ddpm" in msg and "\n" not in msg


def test_load_from_directory_roundtrip(saved_tiny_unet):
    path, ref = saved_tiny_unet
    m = load_model(str(path))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(m.eps_fn()(x, t), ref.eval()(x, t).sample, atol=1e-6)
    assert m.sample_shape == (1, 8, 8) and m.sampler.steps == 100
    out = m.generate(3, seed=0, sampler=m.sampler.__class__(steps=4))
    assert out.shape == (3, 1, 8, 8)


def test_truncated_checkpoint_is_one_clear_line(saved_tiny_unet):
    path, _ = saved_tiny_unet
    w = path / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    with pytest.raises(BenchError) as e:
        load_model(str(path))
    assert "corrupt or incomplete" in str(e.value) and "\n" not in str(e.value)


def test_missing_weights_and_corrupt_config(saved_tiny_unet):
    path, _ = saved_tiny_unet
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BenchError, match="no weights"):
        load_model(str(path))
    (path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(BenchError, match="corrupt"):
        load_model(str(path))


def test_digits_split_is_fixed_and_disjoint():
    xtr, ytr = load_digits_split("train")
    xte, yte = load_digits_split("test")
    assert xtr.shape[1:] == (1, 16, 16) and len(xtr) + len(xte) == 1797
    assert xtr.min() >= -1 and xtr.max() <= 1
    assert set(yte.tolist()) == set(range(10))
    with pytest.raises(UsageError):
        load_digits_split("validation")


def test_wrong_image_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="expected an image tensor"):
        to_uint8_rgb(torch.zeros(2, 16, 16))
    assert to_uint8_rgb(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4, 4)
