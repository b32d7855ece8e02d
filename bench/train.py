"""Training entry points for the embedded models.

    python -m bench.train digits                 # digits-ddpm (bench/assets/digits-ddpm), ~45 min on 2 CPU cores
    python -m bench.train digits --arch cosine   # digits-cosine (bench/assets/digits-cosine)
    python -m bench.train classifier   # the small digits classifier behind digits-FID (bench/assets)

Both reproduce the committed weights from a seed (bit-exact on the same machine type and torch version).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from bench.errors import cli_main
from bench.models.digits import DigitsTrainConfig, train_digits
from bench.harness.devices import HELP as DEVICE_HELP, resolve_device


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("digits", help="train an embedded digits UNet (--arch ddpm: digits-ddpm, cosine: digits-cosine)")
    for k, v in asdict(DigitsTrainConfig()).items():
        d.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v, help=f"(default: {v})")
    d.add_argument("--out", type=Path, default=None, help="output directory (default: bench/assets/<model name>)")
    d.add_argument("--device", default="auto", type=resolve_device, help=f"torch device: {DEVICE_HELP}")
    c = sub.add_parser("classifier", help="train the digits classifier used by digits-FID")
    c.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.what == "digits":
        cfg = DigitsTrainConfig(**{k: getattr(args, k) for k in asdict(DigitsTrainConfig())})
        meta = train_digits(cfg, args.out, args.device)
        print(f"saved {meta['name']} in {meta['train']['wall_seconds']:.0f}s, final loss {meta['train']['final_loss']:.4f}")
    else:
        from bench.metrics.classifier import train_and_save

        train_and_save(seed=args.seed)


if __name__ == "__main__":
    main()

