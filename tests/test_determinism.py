"""Determinism on CPU: what is bit-identical on every machine, and what only holds up to float noise.

Bit-identical (asserted with torch.equal): the same inputs, seed, batch size and thread count, run twice in one
process. tests/test_methods.py::test_quantize_is_seeded already checks eda-dm with min-max ranges; here the methods
with every source of randomness switched on (L_p range search, AdaRound, QDrop, NDTC sampling, TDAC), sampling from a
quantized model, the bench.sample CLI, and a whole harness cell (bench.harness.cell.run_cell) with fresh caches.

Up to float noise only (asserted with FLOAT_NOISE_TOL): another batch size or thread count. Both change how the
kernels split their sums, and on another CPU they round differently anyway, so a quantized model's samples are not
bit-stable across them (a rounding decision of an activation quantizer can flip). That is why the batch size is part
of the cell key and the thread count and CPU kernels are recorded with every row (bench.harness.cell.base_row), and why the
regression check's windows come from measured float noise (bench/check.py, results/noise.md).
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


# Float-noise tolerance for samples of the tiny W4A8 model: mean |a - b| / mean |a|. Measured by
# test_float_noise_is_below_tolerance (slow) over seeds 0-29, 8 samples each, on a 2-core AMD EPYC (AVX512): batch 4
# and 2 against 8 moved the samples by at most 1.2e-5, 2 threads against 1 by 1.1e-5, batch 1 by 3.3e-3 (one
# flipped rounding decision); another seed moves them by 1.3 or more. 1e-2 is 3x the largest float change and a
# hundredth of a seed change: a batch-dependent noise draw or a batch-coupled layer still fails it.
FLOAT_NOISE_TOL = 1e-2


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / a.abs().mean())


@pytest.fixture(scope="module")
def rtn_unet(model, trajectories):
    return get_method("rtn").quantize(model, "W4A8", trajectories, seed=0, overrides=tiny("rtn"), progress=False).unet


def test_sampling_twice_identical(model, rtn_unet):
    """Same seed, batch size and threads in one process: bit-identical, FP and quantized."""
    for unet in (None, rtn_unet):
        a = model.generate(4, seed=11, unet=unet, batch_size=2)
        assert torch.equal(a, model.generate(4, seed=11, unet=unet, batch_size=2))
        assert not torch.equal(a, model.generate(4, seed=12, unet=unet, batch_size=2))


@pytest.mark.parametrize("batch_size", [2, 1])
def test_batch_size_changes_samples_by_float_noise_only(model, rtn_unet, batch_size):
    """Each sample's initial noise comes from the seed and its index, never from its batch, so another batch size
    only changes rounding: within FLOAT_NOISE_TOL, while another seed is far outside it."""
    a = model.generate(4, seed=11, unet=rtn_unet, batch_size=4)
    assert relative_change(a, model.generate(4, seed=11, unet=rtn_unet, batch_size=batch_size)) < FLOAT_NOISE_TOL
    assert relative_change(a, model.generate(4, seed=12, unet=rtn_unet, batch_size=4)) > 100 * FLOAT_NOISE_TOL


def test_thread_count_changes_samples_by_float_noise_only(model, rtn_unet):
    a = model.generate(4, seed=11, unet=rtn_unet, batch_size=4)
    torch.set_num_threads(2)
    try:
        b = model.generate(4, seed=11, unet=rtn_unet, batch_size=4)
    finally:
        torch.set_num_threads(1)
    assert relative_change(a, b) < FLOAT_NOISE_TOL


@pytest.mark.slow
def test_float_noise_is_below_tolerance(model, rtn_unet):
    """Re-measures FLOAT_NOISE_TOL's numbers (seeds 0-29): the worst float change must stay 3x below it."""
    worst = {}
    for seed in range(30):
        a = model.generate(8, seed=seed, unet=rtn_unet, batch_size=8)
        for bs in (4, 2, 1):
            worst[f"batch {bs}"] = max(worst.get(f"batch {bs}", 0.0),
                                       relative_change(a, model.generate(8, seed=seed, unet=rtn_unet, batch_size=bs)))
        torch.set_num_threads(2)
        try:
            b = model.generate(8, seed=seed, unet=rtn_unet, batch_size=8)
        finally:
            torch.set_num_threads(1)
        worst["2 threads"] = max(worst.get("2 threads", 0.0), relative_change(a, b))
    print(worst)
    assert max(worst.values()) < FLOAT_NOISE_TOL / 3, worst


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
    assert a["mse_vs_fp"] == b["mse_vs_fp"] and a["mse_vs_fp"] > 0 and a["eps_mse"] == b["eps_mse"]
    assert a["calib_size"] == b["calib_size"] and a["allocation"] == b["allocation"]
    # what changes results without being a setting is recorded with the row
    assert a["threads"] == torch.get_num_threads() == 1 and a["batch_size"] == 8 and a["cpu_kernels"]


def test_cell_key_includes_batch_size():
    """Results move with the batch size (above), so resume must not treat a batch-32 row as the batch-64 cell."""
    from bench.harness.grid import Cell

    a = Cell(grid="t", model="m", method="rtn", bits="W4A8", seed=0, samples=8, batch_size=8)
    assert Cell(**{**a.to_dict(), "batch_size": 4}).key != a.key
    assert Cell(**{**a.to_dict(), "grid": "other"}).key == a.key  # the grid's name changes nothing
