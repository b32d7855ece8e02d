"""The torch device a CLI runs on: `--device auto` (the default) takes a CUDA GPU when one is visible, else the CPU;
an explicit device that is not there is one clear error instead of a CUDA traceback deep in a model load."""

from __future__ import annotations

import torch

from bench.errors import UsageError

HELP = "auto (default: cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N"


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' or 'cpu'; 'cpu' / 'cuda' / 'cuda:N' checked against what torch sees."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; expected {HELP}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise UsageError(f"device {name!r} is not supported; expected {HELP}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu, or --device auto to take a GPU only when there is one")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return str(dev)
