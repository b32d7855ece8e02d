"""Saved samples: the ADM sample-batch format (uint8 NHWC arr_0) plus the cell's metadata, read back exactly as the
Inception metrics saw them, and re-scored by bench.evaluate --samples without a model."""

import json

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.harness.grid import Cell
from bench.harness.samples import load_samples, samples_path, save_samples
from bench.metrics.data import to_uint8_rgb


def test_round_trip_keeps_what_inception_sees(tmp_path):
    g = torch.Generator().manual_seed(0)
    for c in (1, 3):
        x = torch.rand(5, c, 8, 8, generator=g) * 2.2 - 1.1  # a little out of range: clamped like the metrics do
        p = save_samples(x, tmp_path / f"c{c}.npz", {"dataset": "digits", "model": "m"})
        with np.load(p) as z:  # plain numpy reads it: ADM's layout
            assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, c)
            assert json.loads(str(z["meta"]))["model"] == "m"
        y, meta = load_samples(p)
        assert y.shape == x.shape and meta["dataset"] == "digits"
        assert torch.equal(to_uint8_rgb(y), to_uint8_rgb(x))  # bit-exact for the Inception metrics
        assert (y - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6  # half a gray level in [-1, 1] units


def test_paths_and_bad_files(tmp_path):
    cell = Cell("g", "digits-ddpm", "eda-dm:tdac-only", "W4A8", 2, 8)
    p = samples_path(tmp_path, cell)
    assert p.parent == tmp_path / "g" / "digits-ddpm" / "eda-dm_tdac-only" and p.name == f"W4A8-seed2-{cell.key}.npz"
    with pytest.raises(BenchError, match="no samples file"):
        load_samples(tmp_path / "none.npz")
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(BenchError, match="expected uint8"):
        load_samples(tmp_path / "f.npz")


def test_evaluate_rescores_saved_samples_without_a_model(tmp_path, capsys):
    from bench import evaluate
    from bench.metrics.data import load_digits_split
    from bench.metrics.score import evaluate as score

    x = load_digits_split("test", 16)[0][:64]
    p = save_samples(x, tmp_path / "s.npz", {"dataset": "digits", "model": "digits-ddpm", "method": "fp",
                                              "bits": "FP"})
    got = evaluate.main(["--samples", str(p), "--metrics", "digits_fid,digits_cov"])
    want = score(load_samples(p)[0], "digits", metrics=("digits_fid", "digits_cov"))
    assert got == want and got["digits_coverage"] == 1.0
    assert "digits-ddpm fp FP: 64 saved samples" in capsys.readouterr().out
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))  # no metadata: the dataset is asked for
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--samples", str(tmp_path / "adm.npz"), "--metrics", "digits_cov"])
    assert e.value.code == 2 and "pass --dataset" in capsys.readouterr().err
