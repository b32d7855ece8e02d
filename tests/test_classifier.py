"""The committed digits classifier behind digits-FID / coverage / confidence."""

import torch

from bench.metrics import classifier
from bench.metrics.data import load_digits_split


def test_committed_classifier_accurate_on_held_out():
    assert classifier.accuracy(classifier.load_classifier(), "test") >= 0.95


def test_digits_fid_coverage_confidence():
    x, y = load_digits_split("test")
    assert abs(classifier.digits_fid(x)) < 1e-6
    assert classifier.digits_fid(x, "train") < 50  # held-out vs train: small
    torch.manual_seed(0)
    assert classifier.digits_fid(torch.rand(200, 1, 16, 16) * 2 - 1) > 500  # noise: far
    cov, conf = classifier.coverage_confidence(x)
    assert cov == 1.0 and conf > 0.9
    assert classifier.coverage_confidence(x[y == 3])[0] == 0.1
    # RGB and other sizes are accepted (grey = channel mean, bilinear resize)
    assert classifier.predict(x[:8].expand(-1, 3, -1, -1))[0].tolist() == classifier.predict(x[:8])[0].tolist()


def test_training_deterministic_from_seed():
    cfg = classifier.ClassifierTrainConfig(epochs=1)
    a, _ = classifier.train(cfg)
    b, _ = classifier.train(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_weights_one_line(tmp_path):
    import pytest

    from bench.errors import BenchError

    with pytest.raises(BenchError, match="python -m bench.train classifier"):
        classifier.load_classifier(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BenchError, match="corrupt"):
        classifier.load_classifier(bad)
