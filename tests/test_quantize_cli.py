"""bench.quantize / bench.sample: a round trip on a tiny model saved to a temp dir, and one-line usage errors."""


import pytest
import torch

from bench.quantize import format_allocation, load_config
from bench.quantize import main as quantize_main
from bench.sample import main as sample_main

torch.set_num_threads(2)


def _exit_code(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


def test_round_trip_quantize_then_sample(model_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "q"
    assert quantize_main(["--model", str(model_dir), "--method", "eda-dm", "--bits", "W4A8", "--out", str(out),
                          "--set", "n_samples=8", "--set", "iters=1", "--set", "batch_size=4", "--set",
                          "init_batch=8", "--set", "w_init=minmax", "--set", "a_init=minmax", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "packed" in text and "allocation:" in text and "TDAC: dense_fraction" in text
    grid = tmp_path / "grid.png"
    assert sample_main(["--model", str(out), "--n", "4", "--out", str(grid), "--quiet"]) == 0
    img = Image.open(grid)
    assert img.size[0] > 64 and img.mode == "RGB"
    fp_grid = tmp_path / "fp.png"
    assert sample_main(["--model", str(model_dir), "--n", "4", "--out", str(fp_grid), "--quiet"]) == 0
    assert fp_grid.read_bytes() != grid.read_bytes()


def test_config_file_and_set_precedence(model_dir, tmp_path, capsys):
    cfg = tmp_path / "k.toml"
    cfg.write_text('n_samples = 8\ninit_batch = 8\n[rtn]\ninit = "lp"\n[eda-dm]\nlam = 9.0\n')
    assert load_config(str(cfg), "rtn") == {"n_samples": 8, "init_batch": 8, "init": "lp"}
    assert quantize_main(["--model", str(model_dir), "--method", "rtn", "--config", str(cfg), "--set",
                          "n_samples=4", "--list-knobs"]) == 0
    text = capsys.readouterr().out
    assert "n_samples = 4" in text and "init = 'lp'" in text


@pytest.mark.parametrize("argv", [
    ["--method", "brecq"], ["--method", "eda-dm", "--set", "lamda=1"], ["--method", "eda-dm", "--set", "iters"],
    ["--method", "eda-dm", "--bits", "W1A8"], ["--method", "fp"], ["--method", "eda-dm", "--config", "/nonexistent"],
])
def test_quantize_usage_errors_exit_2(argv, model_dir, tmp_path, capsys):
    assert _exit_code(quantize_main, ["--model", str(model_dir), "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_sample_usage_errors(tmp_path, capsys):
    assert _exit_code(sample_main, ["--model", "no-such-model", "--out", str(tmp_path / "g.png")]) == 2
    assert _exit_code(sample_main, ["--model", "x", "--n", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert _exit_code(sample_main, ["--model", "x", "--out", str(tmp_path / "g.jpg")]) == 2


def test_help_documents_flags(capsys):
    assert _exit_code(quantize_main, ["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--method", "--bits", "--out", "--set", "--config", "--seed"):
        assert flag in text
    assert _exit_code(sample_main, ["--help"]) == 0
    assert "--n " in capsys.readouterr().out


def test_format_allocation():
    assert format_allocation(None) == "none"
    assert format_allocation([0, 3, 0, 5]).startswith("2/4 steps, min 3, max 5: 1:3 3:5")
