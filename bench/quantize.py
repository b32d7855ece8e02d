"""Quantize one model with one method and save it (the official repositories cannot save a quantized model).

    python -m bench.quantize --model digits-ddpm --method eda-dm --bits W4A8 --out runs/q/digits-eda-w4a8 \\
        --set iters_scale=0.02 --set lam=1.0 [--config knobs.toml] [--seed 0]

Records FP sampling trajectories (and the features the method needs), builds the method's calibration set,
reconstructs, and writes the quantized UNet with `eda.checkpoint.save_quantized`; prints a summary (time, packed
size, calibration allocation). Reconstructed units are journalled in OUT/journal as they finish (eda.journal): if
the run is interrupted, the same command resumes from the next unit; the journal is removed once the model is
saved. Method knobs come from `--config` (a TOML file of `knob = value`, optionally with
per-method tables `[eda-dm]`) and `--set key=value` (wins); `--list-knobs` prints a method's knobs and defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.errors import UsageError, cli_main
from bench.harness.seeds import CALIB_OFFSET, calib_seed
from bench.harness.devices import HELP as DEVICE_HELP, resolve_device

JOURNAL_DIR = "journal"  # under --out, while reconstruction is in progress


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (e.g. digits-ddpm) or a diffusers directory")
    p.add_argument("--method", required=True, help="eda-dm, eda-dm:tdac-only, eda-dm:fbr-only, qdiffusion, ptq4dm, "
                                                   "rtn")
    p.add_argument("--bits", default="W4A8", help="bit widths as W<w>A<a> (default W4A8)")
    p.add_argument("--out", help="output directory for the quantized model (required unless --list-knobs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method knob, repeatable (e.g. --set iters_scale=0.02 --set lam=1.0)")
    p.add_argument("--config", help="TOML file of method knobs (flat, or per-method tables like [eda-dm])")
    p.add_argument("--seed", type=int, default=0, help="method seed: calibration selection, QDrop, batches "
                                                        "(default 0)")
    p.add_argument("--calib-seed", type=int, default=None,
                   help=f"noise seed of the recorded FP trajectories (default: seed + {CALIB_OFFSET}, the calibration "
                        "stream of bench/harness/seeds.py, so samples drawn with --seed never start from calibration "
                        "noise)")
    p.add_argument("--device", default="auto", type=resolve_device, help=f"torch device: {DEVICE_HELP}")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size for recording trajectories (default 256)")
    p.add_argument("--list-knobs", action="store_true", help="print the method's knobs with resolved defaults and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_config(path: str | None, method_name: str) -> dict[str, Any]:
    """Knobs from a TOML file: top-level `knob = value`, then the method family's and the method's own tables."""
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path!r} not found; pass a TOML file of knob = value lines") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path!r} is not valid TOML ({e}); expected knob = value lines") from None
    out = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for key in dict.fromkeys((method_name.split(":")[0], method_name)):
        if isinstance(data.get(key), dict):
            out.update(data[key])
    return out


def jsonable(x: Any) -> Any:
    """Tensors, tuples and dataclass-ish values -> plain JSON types (for the checkpoint's metadata)."""
    import torch

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def format_allocation(allocation: list[int] | None, width: int = 20) -> str:
    """'step:count' for the non-zero steps, summarised when long."""
    if not allocation:
        return "none"
    nz = [(i, c) for i, c in enumerate(allocation) if c]
    text = " ".join(f"{i}:{c}" for i, c in nz[:width])
    more = f" ... (+{len(nz) - width} steps)" if len(nz) > width else ""
    return f"{len(nz)}/{len(allocation)} steps, min {min(c for _, c in nz)}, max {max(c for _, c in nz)}: {text}{more}"


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from bench.models import load_model
    from eda.policy import parse_bits
    from eda.registry import get_method, parse_overrides

    torch.set_num_threads(max(1, args.threads))
    method = get_method(args.method)
    parse_bits(args.bits)
    overrides = {**load_config(args.config, args.method), **parse_overrides(args.overrides)}
    if args.list_knobs:
        resolved = method.configure(None, args.bits, overrides)
        for k, v in resolved.knobs().items():
            print(f"{k} = {v!r}")
        return 0
    if not args.out:
        raise UsageError("--out DIR is required (where to save the quantized model)")
    if args.method == "fp":
        raise UsageError("method 'fp' does not quantize; sample the FP model directly: python -m bench.sample "
                         f"--model {args.model}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    method.configure(None, args.bits, overrides)  # fail on bad knobs before loading anything

    from bench.harness.provenance import code_state
    from eda.checkpoint import packed_size_mb, save_quantized
    from eda.journal import Journal
    from eda.trajectories import record_trajectories

    progress = not args.quiet
    model = load_model(args.model, device=args.device)
    n_traj, feature_modules = method.calibration_request(model, overrides)
    traj_seed = calib_seed(args.seed) if args.calib_seed is None else args.calib_seed
    t0 = time.perf_counter()
    print(f"[1/3] recording {n_traj} FP trajectories ({model.sampler.describe()}, seed {traj_seed})"
          + (f", features of {', '.join(feature_modules)}" if feature_modules else ""), file=sys.stderr)
    traj = record_trajectories(model, n_traj, traj_seed, feature_modules=feature_modules,
                               batch_size=args.batch_size, device=args.device, progress=progress)
    traj_seconds = time.perf_counter() - t0
    print(f"[2/3] {args.method} {args.bits}: calibration + reconstruction", file=sys.stderr)
    journal = Journal(Path(args.out) / JOURNAL_DIR, context=code_state())
    result = method.quantize(model, args.bits, traj, seed=args.seed, overrides=overrides, progress=progress,
                             journal=journal)
    info = result.info
    if info.get("restored_units"):
        print(f"      resumed: {info['restored_units']} reconstructed units restored from {journal.folder}",
              file=sys.stderr)
    print(f"[3/3] saving to {args.out}", file=sys.stderr)
    model_ref = args.model if not os.path.isdir(args.model) else str(Path(args.model).resolve())
    meta = jsonable({"model": model_ref, "method": args.method, "bits": args.bits, "seed": args.seed,
                     "calib_seed": traj_seed, "n_trajectories": n_traj, "sampler": model.sampler.describe(),
                     "trajectory_seconds": traj_seconds, "info": info})
    save_quantized(result.unet, args.out, meta)
    journal.clear()
    sizes = packed_size_mb(result.unet)
    print(f"{args.method} {args.bits} on {model.name}: quantized in {info['quant_seconds']:.1f} s "
          f"(+{traj_seconds:.1f} s trajectories), calibration set {info['calib_size']}")
    print(f"size: {sizes['fp32']:.2f} MB fp32 -> {sizes['packed']:.2f} MB packed")
    print(f"allocation: {format_allocation(info.get('allocation'))}")
    if "tdac" in info:
        print(f"TDAC: dense_fraction {info['tdac']['dense_fraction']:.3f} at r = {info['config']['radius']} "
              f"(pairwise feature MSE min {info['tdac']['mse_min']:.3g}, median {info['tdac']['mse_median']:.3g}, "
              f"max {info['tdac']['mse_max']:.3g}); 0 or 1 means density is degenerate")
    print(f"saved: {args.out}")
    return 0


if __name__ == "__main__":
    main()
