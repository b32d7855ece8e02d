"""`bench.run --dry-run --estimate`: passes counted per part (FP samples and calibration once per seed, sampling per
quantized cell, reconstruction from the method's own stages), costs measured on this device, one line per model."""

import pytest

from bench.harness.grid import Cell
from tests.test_run import run, write_grid


def test_passes_are_counted_per_seed_per_cell_and_per_stage():
    import tests.harness_plugin  # noqa: F401 - registers test-tiny
    from bench.harness.estimate import EPS_PASSES, count_passes
    from bench.harness.cell import get_method
    from bench.models.registry import load_model

    model = load_model("test-tiny")
    steps = model.sampler.steps
    over = {"iters_scale": 0.01, "n_samples": 16}
    cells = [Cell("g", "test-tiny", m, b, s, 10, overrides=over if m != "fp" else {})
             for s in (0, 1) for m, b in (("fp", "FP"), ("rtn", "W4A8"), ("eda-dm", "W4A8"))]
    requests = [("rtn", over), ("eda-dm", over)]
    got = count_passes(model, cells, requests)["parts"]
    # FP samples once per seed (2 seeds) + the quantized samples of 4 cells
    assert got["sampling"] == 10 * steps * (2 + 4)
    assert got["calibration"] == 2 * 16 * steps + 4 * EPS_PASSES * steps
    stages = get_method("eda-dm").configure(model, "W4A8", over).stages("W4A8", 0)
    assert stages and got["reconstruction_train"] == 2 * sum(s.config.iters * s.config.batch_size for s in stages)
    assert got["reconstruction_collect"] == 2 * 16 * len(stages)  # rtn reconstructs nothing


def test_dry_run_prints_an_estimate_per_available_model(tmp_path, capsys):
    grid = write_grid(tmp_path, ["fp", "test-ok"], bits=("W8A8",), seeds=(0, 1))
    assert run("--grid", grid, "--dry-run", "--estimate", "--out", str(tmp_path / "out")) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("estimate:"))
    assert "CPU-hours on this machine" in line or "GPU-hours" in line
    assert "for the 4 cells to run" in line and "UNet forward" in line and "ms/sample" in line
    hours = float(line.split("estimate:")[1].split()[0])
    assert hours > 0
    assert run("--grid", grid, "--estimate", "--out", str(tmp_path / "out")) == 2  # only with --dry-run


@pytest.mark.parametrize("threads", [1])
def test_costs_are_per_sample_and_positive(threads):
    import tests.harness_plugin  # noqa: F401
    from bench.harness.estimate import unit_costs
    from bench.models.registry import load_model

    c = unit_costs(load_model("test-tiny"), "cpu", batch=4, train_batch=2)
    assert 0 < c["forward"] < c["train"] and c["batch"] <= 4 and c["train_batch"] <= 2
