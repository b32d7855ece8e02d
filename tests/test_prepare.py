"""bench.prepare cifar10: the python tarball becomes the reference folder, pixel for pixel, resumably, with its
statistics cached where the cells look; a tampered or wrong file is one error line."""

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from bench.prepare import main


def _tarball(path, n=3, extra=None):
    """A CIFAR-10 python tarball in the real layout, n images per batch."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batches[name] = data
            blob = pickle.dumps(extra if extra and name == "test_batch" else
                                {b"data": data, b"labels": [0] * n, b"batch_label": name.encode()})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches


def test_cifar10_tarball_to_reference_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    batches = _tarball(tmp_path / "c.tar.gz")
    assert main(["cifar10", str(tmp_path / "c.tar.gz"), "--splits", "train,test", "--no-progress"]) == 0
    train = sorted((tmp_path / "data" / "cifar10" / "train").glob("*.png"))
    assert [p.name for p in train] == [f"{i:02d}.png" for i in range(15)]
    want = batches["data_batch_2"][1].reshape(3, 32, 32).transpose(1, 2, 0)  # R, G, B planes -> HWC
    assert np.array_equal(np.asarray(Image.open(train[4])), want)  # batch 2, image 1 = index 3 + 1
    assert len(list((tmp_path / "data" / "cifar10" / "test").glob("*.png"))) == 3
    out = capsys.readouterr().out
    assert "cifar10/train: 15 images" in out and "(15 written now, 0 already there)" in out
    assert "Inception statistics of 15 images cached" in out
    assert any("cifar10_train" in p.name for p in (tmp_path / "cache" / "stats").glob("*.npz"))
    # interrupted run: a missing image is rewritten, nothing else
    train[7].unlink()
    assert main(["cifar10", str(tmp_path / "c.tar.gz"), "--splits", "train", "--no-stats", "--no-progress"]) == 0
    assert "(1 written now, 14 already there)" in capsys.readouterr().out


@pytest.mark.parametrize("what,msg", [("evil", "is not allowed in a CIFAR-10 batch"),
                                      ("wrong", "expected [N, 3072]")])
def test_tampered_or_wrong_batches_are_one_line_errors(tmp_path, monkeypatch, capsys, what, msg):
    import os

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    extra = {"evil": {b"data": os.system}, "wrong": {b"data": np.zeros((2, 10), np.uint8)}}[what]
    _tarball(tmp_path / "c.tar.gz", extra=extra)
    with pytest.raises(SystemExit) as e:
        main(["cifar10", str(tmp_path / "c.tar.gz"), "--splits", "test", "--no-stats", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and msg in err[0]  # a data error, not a usage error


def test_usage_errors(tmp_path, capsys):
    for argv, code, msg in ((["lsun", "x"], 2, "cannot prepare 'lsun' yet"),
                            (["cifar10", "x", "--splits", "val"], 2, "unknown split"),
                            (["cifar10", str(tmp_path / "none.tgz")], 1, "no file at")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code and msg in capsys.readouterr().err
