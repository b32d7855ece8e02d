"""Export a saved quantized model to run on integer kernels (README "Integer inference").

    python -m bench.export q/ --out q-int8/ [--backend x86]
    python -m bench.sample --model q-int8/ --n 64 --out grid.png

The export holds the method's own int8 weight codes, per-channel scales and zero points and the per-tensor activation
scales (eda.integer). Backends: x86 (default: oneDNN u8s8 conv/linear kernels, no compilation) and x86-inductor
(torch.compile with torchao's x86 passes; needs `pip install -e '.[int8]'`, compiles for minutes per input shape).
What a backend cannot run (activations or weights above 8 bits, a soft AdaRound rounding, a weight-only model) ends
in one `error:` line naming the layer and the alternative.
"""

from __future__ import annotations

import argparse

from bench.errors import UsageError, cli_main


def _parser() -> argparse.ArgumentParser:
    from eda.integer import BACKENDS

    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a quantized model directory written by python -m bench.quantize --out")
    p.add_argument("--out", required=True, help="output directory for the integer model")
    p.add_argument("--backend", default="x86",
                   help="; ".join(f"{k}: {v}" for k, v in BACKENDS.items()) + " (default x86)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from eda.integer import BACKENDS, export_checkpoint

    if args.backend not in BACKENDS:
        raise UsageError(f"unknown backend {args.backend!r}; expected one of {', '.join(BACKENDS)}")
    s = export_checkpoint(args.checkpoint, args.out, args.backend)
    print(f"exported {s['method']} {s['bits']} of {s['model']} for backend {s['backend']}: {s['int8_ops']} conv/linear "
          f"on int8 kernels, {s['fp_input_ops']} with an FP input (network output), {s['attention']} attention "
          f"blocks with quantized q/k/v/softmax ({s['bytes'] / 2**20:.2f} MB)")
    print(f"saved: {args.out}  (sample: python -m bench.sample --model {args.out} --out grid.png)")
    return 0


if __name__ == "__main__":
    main()
