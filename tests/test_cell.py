"""bench.harness.cell: the per-step noise-prediction error reuses the shared FP half and equals the direct computation; the
paired per-sample error against FP (mse_vs_fp)."""

import pytest
import torch

from bench.harness.artifacts import ArtifactCache, model_fingerprint
from bench.harness.cell import eps_mse_per_step, shared_fp_eps
from bench.harness.grid import Cell
from bench.models import load_model
from eda.policy import BitPolicy
from eda.trajectories import record_trajectories
from eda.wrap import init_ranges, quantize_unet

torch.set_num_threads(1)


def test_fp_eps_is_shared_and_the_error_unchanged(model_dir, tmp_path):
    model = load_model(str(model_dir))
    traj = record_trajectories(model, 6, seed=0, batch_size=6)
    q = quantize_unet(model.unet, BitPolicy.from_bits("W4A8", w_init="minmax", a_init="minmax"))
    init_ranges(q, traj.select(torch.arange(6) % traj.xs.shape[0]), batch_size=6)
    cell = Cell("g", model.name, "rtn", "W4A8", 0, 8, batch_size=4)
    cache, fp = ArtifactCache(tmp_path), model_fingerprint(model)
    direct = eps_mse_per_step(model, q, traj, 4, "cpu", k=3)
    e1 = shared_fp_eps(model, fp, cell, cache, traj, "cpu", k=3)
    e2 = shared_fp_eps(model, fp, cell, cache, traj, "cpu", k=3)
    assert e1 is e2 and cache.hits == {"memory": 1, "disk": 0, "computed": 1}
    via_cache = eps_mse_per_step(model, q, traj, 4, "cpu", k=3, fp_eps=e1)
    assert via_cache == direct and len(direct) == traj.xs.shape[0] and all(v > 0 for v in direct)
    # a fresh cache on the same disk finds it there
    assert torch.equal(shared_fp_eps(model, fp, cell, ArtifactCache(tmp_path), traj, "cpu", k=3), e1)


def test_reference_split_comes_from_the_model_card(tmp_path, monkeypatch):
    """A zoo card's reference split (COCO val2014 for Stable Diffusion, EDA-DM Tab. 3) is what the cell checks and
    evaluates against, not the default train split."""
    import types

    import pytest
    from PIL import Image

    from bench.harness.cell import require_reference
    from bench.errors import BenchError

    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path))
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "coco" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "train" / "a.png")
    cell = Cell("g", "m", "rtn", "W4A8", 0, 8, metrics=("fid",))
    card = types.SimpleNamespace(dataset="coco", defaults={"reference_split": "val2014"})
    with pytest.raises(BenchError, match="split 'val2014'"):
        require_reference(card, cell)
    (tmp_path / "coco" / "val2014").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "val2014" / "a.png")
    require_reference(card, cell)
    # a model without a card split uses the default (train here), which has an image
    require_reference(types.SimpleNamespace(dataset="coco", defaults={}), cell)


def test_no_evaluated_sample_starts_from_calibration_or_eps_noise(model_dir, tmp_path, monkeypatch):
    """Every x_T the cell draws is recorded: the evaluated samples (FP and quantized share one stream), the
    calibration trajectories and the held-out eps trajectories must come from pairwise disjoint noise."""
    import bench.models.sampling
    from bench.harness.cell import run_cell
    from bench.harness.seeds import calib_seed, eps_seed, sample_seed

    drawn: dict[int, torch.Tensor] = {}
    real, real_chunks = bench.models.sampling.initial_noise, bench.models.sampling._noise_chunks

    def spy(n, shape, seed):
        x = real(n, shape, seed)
        drawn[seed] = x
        return x

    def spy_chunks(n, shape, seed, batch_size):  # streaming sampling draws x_T batch by batch
        for x in real_chunks(n, shape, seed, batch_size):
            drawn[seed] = x if seed not in drawn else torch.cat([drawn[seed], x])
            yield x

    monkeypatch.setattr(bench.models.sampling, "initial_noise", spy)
    monkeypatch.setattr(bench.models.sampling, "_noise_chunks", spy_chunks)
    model = load_model(str(model_dir))
    cell = Cell("g", model.name, "rtn", "W4A8", 3, 12, overrides={"n_samples": 6}, batch_size=4)
    row, _ = run_cell(model, cell, ArtifactCache(tmp_path), [("rtn", {"n_samples": 6})], {}, "cpu")
    assert row["status"] == "ok"
    assert set(drawn) == {sample_seed(3), calib_seed(3), eps_seed(3)}
    assert row["sample_seed"] == sample_seed(3) and row["calib_seed"] == calib_seed(3)
    assert row["sample_seed"] != row["calib_seed"]
    flat = {s: x.flatten(1) for s, x in drawn.items()}
    for a in flat:
        for b in flat:
            if a < b:  # no initial noise vector of one stream equals one of another
                assert not (flat[a][:, None] == flat[b][None]).all(-1).any(), (a, b)


def test_mse_vs_fp_is_a_paired_geometric_mean():
    from bench.harness.cell import mse_vs_fp

    g = torch.Generator().manual_seed(0)
    fp = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    err = torch.randn(32, 1, 8, 8, generator=g) * 0.05
    assert mse_vs_fp(fp, fp) == 0.0
    v = mse_vs_fp(fp + err, fp)
    per = (err ** 2).flatten(1).mean(1)
    assert v == pytest.approx(float(per.log().mean().exp()), rel=1e-5) and v < float(per.mean())
    assert mse_vs_fp(fp + 2 * err, fp) == pytest.approx(4 * v, rel=1e-5)  # every sample worse: by its factor
    one_bad = err.clone()
    one_bad[0] *= 10  # one diverged trajectory out of 32: x100 on its own error
    assert mse_vs_fp(fp + one_bad, fp) == pytest.approx(v * 100 ** (1 / 32), rel=1e-4)
    assert mse_vs_fp(fp + err, fp.roll(1, 0)) > 10 * v  # paired: against another sample's FP image it is large


def test_a_cell_evaluates_with_its_fid_mode_and_statistics_and_records_them(tmp_path, monkeypatch):
    """The grid's fid_mode and reference_stats reach the evaluation and the row's `reference` names them; a missing
    statistics file is caught before sampling."""
    import types

    import numpy as np
    import pytest
    import torch

    from bench.errors import BenchError
    from bench.harness.cell import CellScoring, require_reference

    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    stats = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    np.savez(stats, mu=rng.normal(size=2048), sigma=a @ a.T / 64)
    model = types.SimpleNamespace(dataset="synthetic", defaults={})
    cell = Cell("g", "m", "rtn", "W4A8", 0, 4, metrics=("fid",), fid_mode="legacy_tensorflow",
                reference_stats=str(stats))
    assert cell.key != Cell("g", "m", "rtn", "W4A8", 0, 4, metrics=("fid",)).key  # another configuration
    require_reference(model, cell)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    described: dict = {}
    scoring = CellScoring(model, cell, "cpu", described)
    scoring.add(0, images[:2])
    scoring.add(2, images[2:])
    scores = scoring.result()
    assert np.isfinite(scores["fid"])
    assert described["reference"].startswith("synthetic/train, precomputed ref.npz, stats ")
    assert described["reference"].endswith("mode legacy_tensorflow")
    missing = Cell("g", "m", "rtn", "W4A8", 0, 4, metrics=("fid",), reference_stats=str(tmp_path / "nope.npz"))
    with pytest.raises(BenchError, match="no reference statistics file"):
        require_reference(model, missing)
