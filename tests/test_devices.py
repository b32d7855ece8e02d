"""--device auto on the CLIs: a GPU when one is visible, else the CPU; a device that is not there is one clear
error line (exit 2), not a CUDA traceback."""

import pytest
import torch

from bench.errors import UsageError
from bench.harness.devices import resolve_device


def test_auto_follows_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("CPU") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UsageError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_missing_or_unknown_devices_are_usage_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA device is visible.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(UsageError, match="not supported"):
        resolve_device("meta")


@pytest.mark.parametrize("cli", ["bench.quantize", "bench.sample", "bench.evaluate"])
def test_clis_default_to_auto_and_refuse_a_missing_gpu(cli, monkeypatch, capsys):
    import importlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mod = importlib.import_module(cli)
    extra = {"bench.quantize": ["--method", "rtn", "--out", "x"], "bench.sample": ["--out", "x.png"]}.get(cli, [])
    if hasattr(mod, "_parser"):
        args = mod._parser().parse_args(["--model", "digits-ddpm", *extra])
        assert args.device == "cpu"  # auto, resolved on this CPU-only machine
    with pytest.raises(SystemExit) as e:
        mod.main(["--model", "digits-ddpm", "--device", "cuda", *extra])
    assert e.value.code == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
