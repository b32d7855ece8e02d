"""`python -m bench.prepare DATASET SOURCE`: turn a downloaded dataset into the reference folder the harness reads
(`$EDA_BENCH_DATA/<dataset>/<split>/`), and compute its Inception statistics once (cached, as every grid cell would).

    python -m bench.prepare cifar10 ~/Downloads/cifar-10-python.tar.gz          # train (FID reference) and test
    python -m bench.prepare cifar10 cifar-10-python.tar.gz --splits test --no-stats

Resumable: images already written are kept, so an interrupted run continues where it stopped. Supported now:
cifar10 (the python tarball). LSUN (lmdb export), ImageNet (validation folder) and COCO (val2014) are not yet
supported: put their images as PNG/JPEG files in `$EDA_BENCH_DATA/<dataset>/<split>/` by hand.
"""

from __future__ import annotations

import argparse

from bench.errors import UsageError, cli_main
from bench.metrics.names import FID_MODES

DATASETS = ("cifar10",)


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("source", help="what you downloaded (cifar10: cifar-10-python.tar.gz)")
    p.add_argument("--splits", default="train,test", help="comma-separated splits to write (default: train,test)")
    p.add_argument("--no-stats", dest="stats", action="store_false",
                   help="do not compute the Inception statistics now (the first grid cell will)")
    p.add_argument("--fid-mode", default="clean", choices=FID_MODES, help="FID mode of the statistics (default clean)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        raise UsageError(f"cannot prepare {args.dataset!r} yet; supported: {', '.join(DATASETS)}. For other datasets "
                         "put the images as PNG/JPEG files in $EDA_BENCH_DATA/<dataset>/<split>/")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "test")]
    if bad:
        raise UsageError(f"unknown split(s) {bad} for cifar10; expected train and/or test")
    from bench.metrics.prepare import prepare_cifar10
    from bench.metrics.reference import data_dir, reference_stats

    root = data_dir()  # where every cell looks: $EDA_BENCH_DATA, else ~/.cache/eda-bench/data
    done = prepare_cifar10(args.source, root, splits, args.progress)
    for split, (total, written) in done.items():
        print(f"cifar10/{split}: {total} images in {root / 'cifar10' / split} ({written} written now, "
              f"{total - written} already there)")
        if args.stats:
            stats = reference_stats("cifar10", split, 32, progress=args.progress, mode=args.fid_mode)
            print(f"cifar10/{split}: Inception statistics of {len(stats['pool'])} images cached ({args.fid_mode})")
    return 0


if __name__ == "__main__":
    main()
