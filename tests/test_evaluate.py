"""The main-job CLI (python -m bench.evaluate) and the quality of the committed digits-ddpm checkpoint."""

import pytest
import torch

from bench import evaluate as ev
from bench.models.digits import DIGITS_DIR


def test_help_documents_flags(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--n", "--seed", "--out", "--card", "--metrics", "--extractor"):
        assert flag in out


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()  # the CLI sets the process-wide torch thread count
    yield
    torch.set_num_threads(n)


def test_end_to_end_tiny_model(tmp_path, monkeypatch, capsys, keep_threads):
    """Random tiny UNet, 2 DDIM steps, digits metrics only (no Inception): sampling, metrics, grid, summary."""
    from tests.conftest import make_tiny_model

    model = make_tiny_model(steps=2)
    monkeypatch.setattr("bench.models.load_model", lambda name, device="cpu": model)
    grid = tmp_path / "grid.png"
    result = ev.main(["--model", "tiny", "--n", "12", "--batch-size", "5", "--threads", "1",
                      "--metrics", "digits_fid,digits_cov", "--out", str(grid)])
    out = capsys.readouterr().out
    assert "sampled 12 images" in out and "digits-FID" in out
    assert set(result) == {"digits_fid", "digits_coverage", "digits_confidence"}
    assert grid.is_file() and grid.stat().st_size > 0


def test_sample_images_deterministic():
    from tests.conftest import make_tiny_model

    model = make_tiny_model(steps=2)
    a, _ = ev.sample_images(model, 6, seed=3, batch_size=4, progress=False)
    b, _ = ev.sample_images(model, 6, seed=3, batch_size=4, progress=False)
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)


def test_bad_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", "no-such-model", "--n", "4"])
    assert e.value.code == 2 and "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["--n", "1"])
    assert e.value.code == 2


@pytest.mark.skipif(not (DIGITS_DIR / "unet" / "config.json").is_file(), reason="digits-ddpm not trained yet")
def test_committed_checkpoint_makes_recognisable_digits():
    """The real quality assertion: 64 samples from the committed digits-ddpm with its own sampler (DDIM 100 quad)
    are recognised by the held-out-validated classifier with high confidence and cover all ten digits."""
    from bench.metrics import classifier
    from bench.models import load_model

    model = load_model("digits-ddpm")
    images, _ = ev.sample_images(model, 64, seed=0, progress=False)
    labels, probs = classifier.predict(images)
    conf = probs.max(1).values
    assert len(set(labels.tolist())) == 10, f"classes covered: {sorted(set(labels.tolist()))}"
    assert conf.mean() > 0.9, f"mean confidence {conf.mean():.3f}"
    assert (conf > 0.8).float().mean() > 0.85


def test_write_card_tiny(tmp_path):
    """The card writer on a tiny model with made-up metrics: markdown table, sample grid, timing line."""
    from bench.studies.model_card import write_card
    from tests.conftest import make_tiny_model

    model = make_tiny_model(steps=2)
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    m = {"fid": 12.3, "kid": 0.01, "is": float("nan"), "digits_fid": 4.5, "digits_coverage": 0.9}
    path = write_card(model, tmp_path / "tiny.md", 8, 0, m, m, m, 1.5, images, "python -m bench.evaluate", 1,
                      load=3.0)
    text = path.read_text()
    assert "| FID (Inception) | 12.300 |" in text and "Inception Score is n/a" in text
    assert "load average 3.0" in text and (tmp_path / "tiny-samples.png").is_file()
