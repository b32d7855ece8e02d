"""FID modes and precomputed reference statistics: the legacy_tensorflow resize is TF1's resize_bilinear, each mode
keeps its own cached statistics, a clean-fid or ADM .npz stands in for the reference images (same FID), and every
evaluation names its reference set, extractor and mode."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import BenchError, UsageError
from bench.metrics.inception import PT_INCEPTION, inception_features, tf_bilinear_resize
from bench.metrics.reference import load_stats_file, reference_stats
from bench.metrics.score import evaluate


def tf1_resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) on [H, W]: destination pixel j
    reads source position j * H / size; the upper neighbour clamps at the last row/column."""
    h, w = img.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * h / size
        y0, fy = int(math.floor(y)), y - math.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            x = j * w / size
            x0, fx = int(math.floor(x)), x - math.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bot * fy
    return out


@pytest.mark.parametrize("h", [16, 32])
def test_legacy_tensorflow_resize_is_tf1_bilinear(h):
    g = torch.Generator().manual_seed(h)
    x = torch.randint(0, 256, (1, 1, h, h), generator=g).float()
    ours = tf_bilinear_resize(x)[0, 0].numpy()
    want = tf1_resize_bilinear(x[0, 0].numpy().astype(np.float64), 299)
    assert np.abs(ours - want).max() < 1e-3  # float32 grid arithmetic; values are 0..255


@pytest.fixture
def refset(tmp_path, monkeypatch):
    """Six small reference images in a folder, and a private statistics cache."""
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "ref"
    folder.mkdir()
    imgs = (torch.rand(6, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    samples = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    return folder, samples


def test_modes_give_their_own_features_and_statistics(refset, tmp_path):
    folder, samples = refset
    u8 = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    clean = inception_features(u8, mode="clean")["pool"]
    tf = inception_features(u8, mode="legacy_tensorflow")["pool"]
    assert clean.shape == tf.shape == (5, 2048) and not np.allclose(clean, tf, atol=1e-3)  # another resize
    out = {}
    for mode in ("clean", "legacy_tensorflow"):
        d: dict = {}
        out[mode] = evaluate(samples, "synthetic", metrics=("fid",), reference_dir=folder, mode=mode, described=d,
                             progress=False)["fid"]
        assert d["reference"].startswith("synthetic/train, 6 images, stats ") and d["reference"].endswith(
            f"extractor fid-helper, mode {mode}")
    assert out["clean"] != out["legacy_tensorflow"]
    names = sorted(p.name for p in (tmp_path / "cache" / "stats").glob("*.npz"))
    assert len(names) == 2 and any("legacy_tensorflow" in n for n in names)  # one cached set per mode
    with pytest.raises(UsageError, match="unknown FID mode 'tf'"):
        evaluate(samples, "synthetic", metrics=("fid",), reference_dir=folder, mode="tf")


def test_precomputed_statistics_stand_in_for_the_images(refset, tmp_path):
    folder, samples = refset
    ref = reference_stats("synthetic", "train", 16, reference_dir=folder, progress=False)
    want = evaluate(samples, "synthetic", metrics=("fid", "kid", "sfid"), reference_dir=folder, progress=False)
    cleanfid = tmp_path / "cifar10_clean_train_32.npz"
    np.savez(cleanfid, mu=ref["mu"], sigma=ref["sigma"])  # clean-fid's format
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["spatial_mu"], sigma_s=ref["spatial_sigma"],
             arr_0=np.zeros((2, 16, 16, 3), np.uint8))  # ADM's reference batch format
    for f in (cleanfid, adm):
        d: dict = {}
        got = evaluate(samples, "synthetic", metrics=("fid", "kid", "sfid"), stats_file=f, described=d,
                       progress=False)
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-9)
        assert math.isnan(got["kid"])  # no per-image features in a statistics file
        assert (got["sfid"] == pytest.approx(want["sfid"], rel=1e-9)) if f == adm else math.isnan(got["sfid"])
        assert f"precomputed {f.name}" in d["reference"]
    # the same statistics hash as the set they came from
    d_img: dict = {}
    evaluate(samples, "synthetic", metrics=("fid",), reference_dir=folder, described=d_img, progress=False)
    assert d_img["reference"].split("stats ")[1][:12] == d["reference"].split("stats ")[1][:12]


def test_bad_statistics_files_are_one_line_errors(tmp_path):
    with pytest.raises(BenchError, match="no reference statistics file"):
        load_stats_file(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BenchError, match="could not read reference statistics"):
        load_stats_file(tmp_path / "junk.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(BenchError, match=r"expected mu \[2048\].*got \{'mu': \(64,\), 'sigma': \(64, 64\)\}"):
        load_stats_file(tmp_path / "small.npz")


def test_legacy_pytorch_needs_its_weights_and_runs_with_them(tmp_path, monkeypatch):
    """pytorch-fid's network is read from torch's hub cache: missing, one line naming the file; present (here a
    randomly initialised file of the same architecture), pool features of the pytorch-fid port."""
    import torchvision

    from bench.metrics import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    inception._load_pytorch_fid.cache_clear()
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(BenchError, match=f"legacy_pytorch needs pytorch-fid's Inception weights at .*{PT_INCEPTION}"):
        inception_features(u8, mode="legacy_pytorch")
    import cleanfid.inception_pytorch as ip

    built = []
    with monkeypatch.context() as m:  # build the architecture once without weights, to write a file of its shape
        m.setattr(ip, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, sd, *a, **k: built.append(self))
        ip.fid_inception_v3()
    path = tmp_path / "torch" / "hub" / "checkpoints" / PT_INCEPTION
    path.parent.mkdir(parents=True)
    torch.save(built[0].state_dict(), path)
    feats = inception_features(u8, mode="legacy_pytorch")
    assert set(feats) == {"pool"} and feats["pool"].shape == (2, 2048) and np.isfinite(feats["pool"]).all()
    inception._load_pytorch_fid.cache_clear()
