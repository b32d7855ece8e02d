"""Saved quantized model directories (python -m bench.quantize --out) in bench.evaluate and bench.sample, and the
offline download hint naming the command the installed huggingface_hub provides."""

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory):
    from bench.quantize import main as quantize_main

    out = tmp_path_factory.mktemp("q") / "q"
    assert quantize_main(["--model", str(model_dir), "--method", "rtn", "--bits", "W4A8", "--out", str(out),
                          "--set", "n_samples=4", "--quiet"]) == 0
    return out


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()  # the CLIs set the process-wide torch thread count
    yield
    torch.set_num_threads(n)


def test_evaluate_takes_a_saved_quantized_dir(quantized_dir, model_dir, capsys, keep_threads):
    from bench import evaluate as ev

    argv = ["--n", "4", "--batch-size", "4", "--threads", "1", "--metrics", "digits_cov", "--seed", "11"]
    q = ev.main(["--model", str(quantized_dir), *argv])
    out = capsys.readouterr().out
    assert "rtn W4A8 of tiny: sampled 4 images" in out and set(q) >= {"digits_coverage"}
    ev.main(["--model", str(model_dir), *argv])
    assert "tiny (FP): sampled 4 images" in capsys.readouterr().out


def test_sample_takes_a_saved_quantized_dir(quantized_dir, tmp_path, capsys, keep_threads):
    from bench.sample import main as sample_main

    out = tmp_path / "q.png"
    assert sample_main(["--model", str(quantized_dir), "--n", "2", "--out", str(out), "--quiet", "--seed", "11",
                        "--threads", "1"]) == 0
    assert out.is_file() and "rtn W4A8 of tiny" in capsys.readouterr().err


def test_evaluate_refuses_the_calibration_seed(quantized_dir, capsys, keep_threads):
    import json

    from bench import evaluate as ev
    from eda.checkpoint import CONFIG_FILE

    seed = json.loads((quantized_dir / CONFIG_FILE).read_text()).get("meta", {}).get("calib_seed")
    if seed is None:
        pytest.skip("this checkpoint records no calibration seed")
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(quantized_dir), "--n", "4", "--seed", str(seed), "--metrics", "digits_cov"])
    assert e.value.code == 2 and "calibrated on" in capsys.readouterr().err


def test_download_hint_names_the_installed_command(monkeypatch, tmp_path):
    from bench.errors import BenchError, hf_download_command
    from bench.metrics import clip_score
    from bench.models.zoo import ZOO, _missing_message

    cmd = hf_download_command()
    # the executable the hint names is installed next to this Python (hf with huggingface_hub >= 0.34)
    assert (Path(sys.executable).parent / cmd.split()[0]).exists(), cmd
    entry = next(e for e in ZOO.values() if e.hub_id)
    msg = _missing_message(entry, [])
    assert f"`{cmd} {entry.hub_id}`" in msg and "\n" not in msg
    monkeypatch.setenv(clip_score.ENV_CLIP, str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BenchError) as e:
        clip_score.resolve_clip_dir()
    assert f"`{cmd} {clip_score.CLIP_ID}`" in str(e.value)
