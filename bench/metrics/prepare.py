"""Reference data from what a user downloaded: the folder layout bench.metrics.reference reads
(`$EDA_BENCH_DATA/<dataset>/<split>/*.png`) and, optionally, its Inception statistics in the cache.

CIFAR-10: the python tarball of https://www.cs.toronto.edu/~kriz/cifar.html (`cifar-10-python.tar.gz`, holding
`cifar-10-batches-py/data_batch_1..5` and `test_batch`). Each batch is a pickle of {b"data": uint8 [10000, 3072]
(R, G, B planes of 32x32, row-major), b"labels", ...}; it is read with an unpickler that builds nothing but numpy
arrays, lists, dicts and bytes, so a tampered file cannot run code. Images are written as <index>.png (index within
the split, zero-padded), each file atomically, so an interrupted run resumes where it stopped and a rerun rewrites
nothing.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import uuid
import zipfile
from pathlib import Path

import numpy as np

from bench.errors import BenchError

CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _ArraysOnly(pickle.Unpickler):
    """Unpickler for the CIFAR batches: numpy arrays and plain containers only."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _read_batch(data: bytes, name: str) -> np.ndarray:
    try:
        d = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
        arr = np.asarray(d[b"data"], dtype=np.uint8)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise BenchError(f"{name} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); expected the "
                         "cifar-10-python.tar.gz of https://www.cs.toronto.edu/~kriz/cifar.html") from None
    if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise BenchError(f"{name}: data is {arr.shape}; expected [N, 3072] (CIFAR-10 python format)")
    return arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC


def cifar10_batches(tarball: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The uint8 NHWC images of a CIFAR-10 split, batch by batch, from the python tarball."""
    p = Path(tarball)
    if not p.is_file():
        raise BenchError(f"no file at {p}; download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/"
                         "cifar.html and pass its path")
    try:
        with tarfile.open(p, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [b for b in CIFAR_SPLITS[split] if b not in members]
            if missing:
                raise BenchError(f"{p} has no {', '.join(missing)}; expected cifar-10-batches-py/"
                                 f"{{{', '.join(CIFAR_SPLITS[split])}}} (the CIFAR-10 python version)")
            return [_read_batch(tar.extractfile(members[b]).read(), b) for b in CIFAR_SPLITS[split]]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BenchError(f"could not read {p} as a tar archive ({type(e).__name__}); expected "
                         "cifar-10-python.tar.gz") from None


def write_images(images: np.ndarray, folder: Path, start: int, width: int, progress=None) -> int:
    """Write NHWC uint8 images as <start + i>.png, skipping files that exist (each written atomically); returns how
    many were written."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, img in enumerate(images):
        path = folder / f"{start + i:0{width}d}.png"
        if not path.is_file():
            tmp = folder / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.png"
            Image.fromarray(img).save(tmp)
            os.replace(tmp, path)
            written += 1
        if progress is not None:
            progress.update(1)
    return written


def prepare_cifar10(tarball, out_root: Path, splits=("train", "test"), show_progress: bool = True) -> dict:
    """{split: (images in the folder, newly written)} after writing the tarball's splits under out_root/cifar10."""
    from tqdm.auto import tqdm

    done = {}
    for split in splits:
        batches = cifar10_batches(tarball, split)
        total = sum(len(b) for b in batches)
        folder = Path(out_root) / "cifar10" / split
        with tqdm(total=total, desc=f"cifar10/{split}", unit="img", disable=not show_progress) as bar:
            start, written = 0, 0
            for b in batches:
                written += write_images(b, folder, start, len(str(total - 1)), bar)
                start += len(b)
        done[split] = (total, written)
    return done


# ---------------------------------------------------------------------------------------------------------------
# LSUN (lmdb exports), ImageNet (the validation folder) and COCO (val2014 images + captions): the encoded files are
# copied as they are (no re-encoding, so nothing is lost), each verified by decoding it once, written atomically.

def _image_ext(data: bytes) -> str | None:
    """The file type of encoded image bytes by their magic number: LSUN stores WebP (and older exports JPEG)."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return None


def _verified(data: bytes, what: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BenchError(f"{what} is not a readable image ({type(e).__name__}); is the download complete?") from None


def write_encoded(items, folder: Path, progress=None) -> tuple[int, int]:
    """items: (file stem, encoded bytes) -> <folder>/<stem><ext>; files already there are kept (a rerun resumes).
    Returns (images in the folder from these items, newly written)."""
    folder.mkdir(parents=True, exist_ok=True)
    total = written = 0
    for stem, data in items:
        ext = _image_ext(data)
        if ext is None:
            raise BenchError(f"{stem}: not a JPEG, PNG or WebP image; expected the dataset's image files")
        path = folder / f"{stem}{ext}"
        if not path.is_file():
            _verified(data, stem)
            tmp = folder / f".{stem}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
            written += 1
        total += 1
        if progress is not None:
            progress.update(1)
    return total, written


def lsun_items(source: str | os.PathLike, limit: int):
    """(index stem, bytes) of the first `limit` images of an LSUN lmdb export (the folder holding data.mdb, as
    `bedroom_train_lmdb.zip` unpacks), in key order."""
    p = Path(source)
    if p.is_file() and p.name == "data.mdb":
        p = p.parent
    if not (p / "data.mdb").is_file():
        raise BenchError(f"no LSUN lmdb export at {p} (expected a folder with data.mdb, e.g. bedroom_train_lmdb/ "
                         "from LSUN's bedroom_train_lmdb.zip, unzipped)")
    try:
        import lmdb
    except ImportError:
        raise BenchError("reading LSUN's lmdb export needs the lmdb package: pip install lmdb "
                         "(or pip install -e '.[data]')") from None
    try:
        env = lmdb.open(str(p), readonly=True, lock=False, readahead=False, max_readers=1, subdir=True)
    except lmdb.Error as e:
        raise BenchError(f"could not open the lmdb export {p} ({type(e).__name__}: {e})") from None
    width = len(str(max(limit - 1, 0)))
    with env, env.begin(write=False) as txn:
        for i, (_, value) in enumerate(txn.cursor()):
            if i >= limit:
                break
            yield f"{i:0{width}d}", bytes(value)


def folder_items(source: str | os.PathLike, limit: int | None = None, keep=None):
    """(file stem, bytes) of the image files of a folder (recursively) or a .zip, in sorted path order; `keep(stem)`
    filters. Stems are the file names without extension (ILSVRC2012_val_00000001, COCO_val2014_000000000042)."""
    from bench.metrics.reference import IMAGE_EXTENSIONS

    p = Path(source)
    n = 0
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_EXTENSIONS):
            if keep is None or keep(f.stem):
                yield f.stem, f.read_bytes()
                n += 1
                if limit is not None and n >= limit:
                    return
        return
    if not p.is_file():
        raise BenchError(f"no folder or .zip at {p}")
    try:
        with zipfile.ZipFile(p) as z:
            names = sorted(m for m in z.namelist() if Path(m).suffix.lower() in IMAGE_EXTENSIONS)
            for m in names:
                if keep is None or keep(Path(m).stem):
                    yield Path(m).stem, z.read(m)
                    n += 1
                    if limit is not None and n >= limit:
                        return
    except zipfile.BadZipFile:
        raise BenchError(f"{p} is neither a folder nor a readable .zip of images") from None


def coco_captions(path: str | os.PathLike) -> dict:
    """captions_val2014.json (or annotations_trainval2014.zip holding it) -> the parsed JSON, checked."""
    import json

    p = Path(path)
    if not p.is_file():
        raise BenchError(f"no captions file at {p}; download annotations_trainval2014.zip from cocodataset.org and "
                         "pass it (or the captions_val2014.json inside) with --captions")
    try:
        if p.suffix == ".zip":
            with zipfile.ZipFile(p) as z:
                member = next((m for m in z.namelist() if m.endswith("captions_val2014.json")), None)
                if member is None:
                    raise BenchError(f"{p} holds no annotations/captions_val2014.json")
                data = json.loads(z.read(member))
        else:
            data = json.loads(p.read_text())
        ids = {int(a["image_id"]) for a in data["annotations"] if str(a["caption"]).strip()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        raise BenchError(f"{p} is not a COCO captions file (expected annotations[].image_id and .caption)") from None
    return {"data": data, "image_ids": ids}
