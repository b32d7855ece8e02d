"""Convert an original CompVis latent-diffusion `.ckpt` to a diffusers-layout model folder the zoo loads.

    python -m bench.convert lsun-bedroom-ldm4 models/ldm/lsun_beds256/model.ckpt ~/models/lsun-bedroom-ldm4

The key maps and architectures are in bench/models/compvis.py. The checkpoint is read with
`torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import argparse

from bench.errors import cli_main
from bench.models.compvis import PRESETS, convert


@cli_main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(PRESETS), help="which paper model the checkpoint is")
    ap.add_argument("ckpt", help="the original model.ckpt")
    ap.add_argument("out_dir", help="output folder (then put it in $EDA_BENCH_MODELS/<name>/, or pass it to "
                                    "load_model(..., model_dir=))")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA copy")
    args = ap.parse_args(argv)
    out = convert(args.ckpt, args.out_dir, args.model, use_ema=not args.no_ema)
    print(f"converted {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
