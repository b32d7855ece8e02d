"""`python -m bench.prepare DATASET SOURCE`: turn a downloaded dataset into the reference folder the harness reads
(`$EDA_BENCH_DATA/<dataset>/<split>/`), and compute its Inception statistics once (cached, as every grid cell would).

    python -m bench.prepare cifar10 ~/Downloads/cifar-10-python.tar.gz          # train (FID reference) and test
    python -m bench.prepare cifar10 cifar-10-python.tar.gz --splits test --no-stats
    python -m bench.prepare lsun-bedroom bedroom_train_lmdb/ --limit 50000      # LSUN's lmdb export, unzipped
    python -m bench.prepare lsun-church church_outdoor_train_lmdb/
    python -m bench.prepare imagenet ILSVRC2012_img_val/                        # or ILSVRC2012_img_val.tar unpacked
    python -m bench.prepare coco val2014/ --captions annotations_trainval2014.zip

What each writes: cifar10 decodes the python pickles (numpy arrays only) into PNGs; the others copy the encoded
JPEG/PNG/WebP files as they are (verified by decoding each once), LSUN's named by their index in key order,
ImageNet's and COCO's by their file names. COCO keeps the images that have captions and puts the captions where the
sd-v1-4 model looks for them (`$EDA_BENCH_DATA/coco/annotations/captions_val2014.json`). The split written is the
one the zoo's models read (train; COCO val2014) unless --split says otherwise.

Resumable: images already written are kept, so an interrupted run continues where it stopped. LSUN needs the lmdb
package (`pip install -e '.[data]'`).
"""

from __future__ import annotations

import argparse

from pathlib import Path

from bench.errors import BenchError, UsageError, cli_main
from bench.metrics.names import FID_MODES

DATASETS = ("cifar10", "lsun-bedroom", "lsun-church", "imagenet", "coco")
# The side the reference images are compared at: the generated images' (EDA-DM Sec. 5; SD v1.4 samples 512 x 512).
RESOLUTION = {"cifar10": 32, "lsun-bedroom": 256, "lsun-church": 256, "imagenet": 256, "coco": 512}
DEFAULT_SPLIT = {"lsun-bedroom": "train", "lsun-church": "train", "imagenet": "train", "coco": "val2014"}
LSUN_LIMIT = 50_000  # the papers' sample count; LSUN-Bedroom's train export alone holds 3M images


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("source", help="what you downloaded: cifar-10-python.tar.gz; LSUN's <category>_train_lmdb "
                   "folder; ImageNet's validation folder (or a .zip of it); COCO's val2014 folder (or val2014.zip)")
    p.add_argument("--splits", default="train,test", help="cifar10: comma-separated splits (default: train,test)")
    p.add_argument("--split", help="the others: split folder to write (default: the one the zoo reads: train; "
                   "coco val2014)")
    p.add_argument("--limit", type=int, help=f"at most this many images (default: LSUN {LSUN_LIMIT}, others all)")
    p.add_argument("--captions", help="coco: captions_val2014.json or annotations_trainval2014.zip")
    p.add_argument("--no-stats", dest="stats", action="store_false",
                   help="do not compute the Inception statistics now (the first grid cell will)")
    p.add_argument("--fid-mode", default="clean", choices=FID_MODES, help="FID mode of the statistics (default clean)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        raise UsageError(f"cannot prepare {args.dataset!r}; supported: {', '.join(DATASETS)}. For other datasets "
                         "put the images as PNG/JPEG files in $EDA_BENCH_DATA/<dataset>/<split>/")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    from bench.metrics.reference import data_dir

    root = data_dir()  # where every cell looks: $EDA_BENCH_DATA, else ~/.cache/eda-bench/data
    if args.dataset == "cifar10":
        done = _cifar10(args, root)
    else:
        done = {args.split or DEFAULT_SPLIT[args.dataset]: _copy(args, root)}
    for split, (total, written) in done.items():
        print(f"{args.dataset}/{split}: {total} images in {root / args.dataset / split} ({written} written now, "
              f"{total - written} already there)")
        if args.stats:
            from bench.metrics.reference import reference_stats

            stats = reference_stats(args.dataset, split, RESOLUTION[args.dataset], progress=args.progress,
                                    mode=args.fid_mode)
            print(f"{args.dataset}/{split}: Inception statistics of {len(stats['pool'])} images cached "
                  f"({args.fid_mode}, {RESOLUTION[args.dataset]} x {RESOLUTION[args.dataset]})")
    return 0


def _cifar10(args, root) -> dict:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "test")]
    if bad:
        raise UsageError(f"unknown split(s) {bad} for cifar10; expected train and/or test")
    from bench.metrics.prepare import prepare_cifar10

    return prepare_cifar10(args.source, root, splits, args.progress)


def _copy(args, root) -> tuple[int, int]:
    """LSUN, ImageNet, COCO: copy the encoded images into the split folder."""
    import shutil

    from tqdm.auto import tqdm

    from bench.metrics import prepare

    split = args.split or DEFAULT_SPLIT[args.dataset]
    folder = root / args.dataset / split
    if args.dataset.startswith("lsun-"):
        limit = args.limit or LSUN_LIMIT
        items, total = prepare.lsun_items(args.source, limit), limit
    elif args.dataset == "coco":
        if not args.captions:
            raise UsageError("coco needs --captions (captions_val2014.json or annotations_trainval2014.zip): the "
                             "sd-v1-4 prompts and the images to keep come from it")
        caps = prepare.coco_captions(args.captions)
        ids = caps["image_ids"]
        items = prepare.folder_items(args.source, args.limit, keep=lambda stem: _coco_id(stem) in ids)
        total = min(len(ids), args.limit or len(ids))
        target = root / "coco" / "annotations" / "captions_val2014.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(args.captions).suffix == ".json":
            shutil.copyfile(args.captions, target)
        else:
            import json

            target.write_text(json.dumps(caps["data"]))
        print(f"coco: captions of {len(ids)} images in {target}")
    else:
        items, total = prepare.folder_items(args.source, args.limit), args.limit
    with tqdm(total=total, desc=f"{args.dataset}/{split}", unit="img", disable=not args.progress) as bar:
        got = prepare.write_encoded(items, folder, bar)
    if got[0] == 0:
        raise BenchError(f"no images found in {args.source} for {args.dataset}")
    return got


def _coco_id(stem: str) -> int | None:
    """COCO_val2014_000000000042 -> 42."""
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None

if __name__ == "__main__":
    main()
