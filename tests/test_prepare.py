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
    for argv, code, msg in ((["lsun", "x"], 2, "cannot prepare 'lsun'; supported: cifar10, lsun-bedroom"),
                            (["cifar10", "x", "--splits", "val"], 2, "unknown split"),
                            (["cifar10", str(tmp_path / "none.tgz")], 1, "no file at")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code and msg in capsys.readouterr().err


def _encoded(fmt: str, seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_lsun_lmdb_export_is_copied_in_key_order_and_resumes(tmp_path, monkeypatch, capsys):
    import lmdb

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    src = tmp_path / "bedroom_train_lmdb"
    blobs = {f"{k:040x}".encode(): _encoded("WEBP" if k % 2 else "JPEG", k) for k in range(6)}
    with lmdb.open(str(src), map_size=1 << 24) as env, env.begin(write=True) as txn:  # LSUN: sha1 keys -> WebP
        for k, v in blobs.items():
            txn.put(k, v)
    argv = ["lsun-bedroom", str(src), "--limit", "4", "--no-stats", "--no-progress"]
    assert main(argv) == 0
    files = sorted((tmp_path / "data" / "lsun-bedroom" / "train").iterdir())
    assert [f.name for f in files] == ["0.jpg", "1.webp", "2.jpg", "3.webp"]
    assert [f.read_bytes() for f in files] == [blobs[k] for k in sorted(blobs)][:4]  # byte for byte, no re-encoding
    assert "lsun-bedroom/train: 4 images" in capsys.readouterr().out
    files[2].unlink()
    assert main(argv) == 0
    assert "(1 written now, 3 already there)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["lsun-church", str(tmp_path / "nope"), "--no-stats", "--no-progress"])
    assert e.value.code == 1 and "no LSUN lmdb export" in capsys.readouterr().err


def test_imagenet_folder_or_zip_and_a_broken_file(tmp_path, monkeypatch, capsys):
    import zipfile

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    val = tmp_path / "val"
    for i, cls in enumerate(["n01440764", "n01443537", "n01440764"]):  # class folders, as valprep.sh leaves them
        (val / cls).mkdir(parents=True, exist_ok=True)
        (val / cls / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(_encoded("JPEG", i))
    assert main(["imagenet", str(val), "--split", "val", "--no-stats", "--no-progress"]) == 0
    out = tmp_path / "data" / "imagenet" / "val"
    assert sorted(p.name for p in out.iterdir()) == [f"ILSVRC2012_val_{i:08d}.jpg" for i in (1, 2, 3)]
    with zipfile.ZipFile(tmp_path / "val.zip", "w") as z:
        for p in sorted(val.rglob("*.JPEG")):
            z.write(p, f"ILSVRC2012_img_val/{p.name}")
    assert main(["imagenet", str(tmp_path / "val.zip"), "--no-stats", "--no-progress", "--limit", "2"]) == 0
    assert len(list((tmp_path / "data" / "imagenet" / "train").iterdir())) == 2  # the zoo's split by default
    capsys.readouterr()
    (val / "n01440764" / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(SystemExit) as e:
        main(["imagenet", str(val), "--split", "val2", "--no-stats", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "is not a readable image" in err[0]


def test_coco_keeps_captioned_images_and_places_the_captions(tmp_path, monkeypatch, capsys):
    import json

    from bench.models.zoo import _captions_file, read_captions

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("EDA_BENCH_CAPTIONS", raising=False)
    imgs = tmp_path / "val2014"
    imgs.mkdir()
    for i in (42, 73, 99):
        (imgs / f"COCO_val2014_{i:012d}.jpg").write_bytes(_encoded("JPEG", i))
    caps = {"annotations": [{"image_id": 42, "caption": "A cat on a mat."},
                            {"image_id": 73, "caption": "Two dogs."}], "images": []}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(caps))
    with pytest.raises(SystemExit) as e:
        main(["coco", str(imgs), "--no-stats", "--no-progress"])
    assert e.value.code == 2 and "--captions" in capsys.readouterr().err
    assert main(["coco", str(imgs), "--captions", str(tmp_path / "captions_val2014.json"), "--no-stats",
                 "--no-progress"]) == 0
    got = sorted(p.name for p in (tmp_path / "data" / "coco" / "val2014").iterdir())
    assert got == ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"]  # 99 has no caption
    assert read_captions(_captions_file()) == ["A cat on a mat.", "Two dogs."]  # where sd-v1-4 reads them
