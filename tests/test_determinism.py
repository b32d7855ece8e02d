"""Determinism on CPU: the same inputs and seed give bit-identical results, run twice.

tests/test_methods.py::test_quantize_is_seeded already checks eda-dm with min-max ranges; here the methods with
every source of randomness switched on (L_p range search, AdaRound, QDrop, NDTC sampling, TDAC), sampling from a
quantized model, the bench.sample CLI, and a whole harness cell (bench.harness.cell.run_cell) with fresh caches.
"""

import pytest
import torch

from eda.registry import get_method
from tests.conftest import tiny
from tests.test_methods import tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(steps=4)


@pytest.fixture(scope="module")
def trajectories(model):
    from eda.trajectories import mid_attention_name, record_trajectories

    return record_trajectories(model, 8, seed=5, feature_modules=(mid_attention_name(model.unet),), batch_size=8)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trajectories_are_seeded(model, trajectories):
    from eda.trajectories import mid_attention_name, record_trajectories

    again = record_trajectories(model, 8, seed=5, feature_modules=(mid_attention_name(model.unet),), batch_size=4)
    assert torch.equal(again.xs, trajectories.xs) and torch.equal(again.ts, trajectories.ts)
    name = mid_attention_name(model.unet)
    assert torch.equal(again.features[name], trajectories.features[name])


@pytest.mark.parametrize("name", ["eda-dm", "qdiffusion", "ptq4dm"])
def test_quantize_twice_identical(name, model, trajectories):
    """Default (L_p) range init, AdaRound and QDrop on: same seed -> same weights, ranges and outputs."""
    m = get_method(name)
    kw = tiny(name, iters=2, n_samples=8) if name != "qdiffusion" else tiny(name, iters=2)
    a = m.quantize(model, "W4A8", trajectories, seed=3, overrides=kw, progress=False)
    b = m.quantize(model, "W4A8", trajectories, seed=3, overrides=kw, progress=False)
    assert a.info["allocation"] == b.info["allocation"] and a.info["calib_size"] == b.info["calib_size"]
    assert _same_state(a.unet, b.unet)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 400, 990])
    with torch.no_grad():
        assert torch.equal(a.unet(x, t).sample, b.unet(x, t).sample)


def test_sampling_twice_identical(model, trajectories):
    q = get_method("rtn").quantize(model, "W4A8", trajectories, seed=0, overrides=tiny("rtn"), progress=False).unet
    a = model.generate(4, seed=11, unet=q, batch_size=4)
    b = model.generate(4, seed=11, unet=q, batch_size=2)  # batch size must not matter for a seed either
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(4, seed=12, unet=q, batch_size=4))


def test_sample_cli_twice_identical(tmp_path, capsys):
    import json

    from bench.sample import main
    from tests.conftest import make_tiny_unet

    d = tmp_path / "m"
    make_tiny_unet(width=8).save_pretrained(d / "unet")
    (d / "bench.json").write_text(json.dumps({"name": "tiny", "dataset": "digits",
                                              "sampler": {"kind": "ddim", "steps": 3, "eta": 0.0, "skip": "quad"}}))
    outs = []
    for i in range(2):
        pt = tmp_path / f"x{i}.pt"
        assert main(["--model", str(d), "--n", "3", "--out", str(tmp_path / f"g{i}.png"), "--save-tensor", str(pt),
                     "--quiet", "--threads", "1"]) == 0
        outs.append(torch.load(pt, weights_only=True))
    assert torch.equal(outs[0], outs[1])
    assert (tmp_path / "g0.png").read_bytes() == (tmp_path / "g1.png").read_bytes()


def test_cell_twice_identical_metrics(tmp_path):
    """A whole harness cell (FP samples, shared trajectories, eda-dm, sampling, digits-FID vs FP) run twice with
    fresh artifact caches gives identical metrics."""
    import tests.harness_plugin  # noqa: F401 - registers test-tiny
    from bench.harness.artifacts import ArtifactCache
    from bench.harness.cell import run_cell
    from bench.harness.grid import Cell
    from bench.models import load_model

    over = tiny("eda-dm", n_samples=4, iters=1, w_init="minmax", a_init="minmax")
    cell = Cell(grid="t", model="test-tiny", method="eda-dm", bits="W4A8", seed=0, samples=8,
                metrics=("digits_fid_vs_fp",), overrides=over, batch_size=8)
    requests = [("eda-dm", over)]
    rows = []
    for i in range(2):
        model = load_model("test-tiny")
        row, _ = run_cell(model, cell, ArtifactCache(tmp_path / f"cache{i}"), requests, {"run_id": str(i)})
        rows.append(row)
    a, b = rows
    assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
    assert a["digits_fid_vs_fp"] == b["digits_fid_vs_fp"] and a["digits_fid_vs_fp"] > 0
    assert a["calib_size"] == b["calib_size"] and a["allocation"] == b["allocation"]
