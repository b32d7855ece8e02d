"""Streaming evaluation: metrics accumulated batch by batch equal the metrics of the whole set, only bounded state is
kept unless a metric needs per-sample features, saved samples stream in and out, and a harness cell samples,
scores and saves one batch at a time with the numbers the whole-tensor computation gives."""

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.metrics.stream import Moments, SampleScorer

torch.set_num_threads(1)


def test_running_moments_match_numpy_far_from_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(301, 7)) * [1, 2, 3, 4, 5, 6, 7] + 1e4  # a large offset: naive sums would cancel
    m = Moments()
    for s in range(0, 301, 64):
        m.add(f[s:s + 64])
    mu, sigma = m.gaussian()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)


def _fake_features(u8, *args, **kwargs):
    x = torch.nn.functional.adaptive_avg_pool2d(u8.float(), 4).flatten(1).double().numpy()
    return {"pool": x, "spatial": x[:, :20], "logits": x[:, :10]}


def _digits(n):
    from bench.metrics.data import load_digits_split

    return load_digits_split("test", 16)[0][:n]


def test_batches_give_the_scores_of_the_whole_set(tmp_path, monkeypatch):
    from bench.metrics.data import to_uint8_rgb
    from tests.test_metrics import _write_pngs

    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("bench.metrics.inception.inception_features", _fake_features)
    ref = _digits(120)
    _write_pngs(tmp_path / "ref", to_uint8_rgb(ref[60:]))
    x = ref[:60] + 0.05 * torch.randn(60, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    metrics = ("fid", "kid", "pr", "sfid", "is", "digits_fid", "digits_cov")
    kw = dict(reference_dir=tmp_path / "ref", progress=False)
    whole = SampleScorer("digits", metrics, **kw, vs_fp=True, digits_vs_fp=True)
    whole.add(x)
    parts = SampleScorer("digits", metrics, **kw, vs_fp=True, digits_vs_fp=True)
    for s in range(0, 60, 7):  # odd batches, the last one short
        parts.add(x[s:s + 7])
    fp = {"pool": Moments(), "digits": Moments()}
    fp["pool"].add(_fake_features(to_uint8_rgb(ref[:60]))["pool"])
    from bench.metrics import classifier

    fp["digits"].add(classifier.features(ref[:60]))
    fp_stats = {k: v.gaussian() for k, v in fp.items()}
    a, b = whole.result(fp_stats), parts.result(fp_stats)
    assert set(a) == set(b) >= {"fid", "kid", "precision", "recall", "sfid", "is", "digits_fid", "digits_coverage",
                                "digits_confidence", "fid_vs_fp", "digits_fid_vs_fp"}
    for k in a:
        # The Fréchet distances take square roots of covariance eigenvalues that are 0 here (a digit's border is
        # blank: constant features), so 1e-12 differences in the summed moments show as ~2e-5 relative; the rest
        # agrees to float64 rounding.
        rel = 1e-4 if "fid" in k else 1e-9
        assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-9), k
    assert a["digits_fid_vs_fp"] > 0 and a["fid_vs_fp"] > 0


def test_only_bounded_state_unless_a_metric_needs_every_feature(tmp_path, monkeypatch):
    from bench.metrics.data import to_uint8_rgb
    from tests.test_metrics import _write_pngs

    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("bench.metrics.inception.inception_features", _fake_features)
    _write_pngs(tmp_path / "ref", to_uint8_rgb(_digits(40)))
    x = _digits(80)
    kw = dict(reference_dir=tmp_path / "ref", progress=False)
    lean = SampleScorer("digits", ("fid", "sfid", "digits_fid", "digits_cov"), **kw)
    heavy = SampleScorer("digits", ("fid", "kid", "is"), **kw)
    for s in range(0, 80, 16):
        lean.add(x[s:s + 16])
        heavy.add(x[s:s + 16])
    assert lean.pools == [] and lean.logits == [] and lean.pool.n == 80  # moments only
    assert sum(len(p) for p in heavy.pools) == 80 and sum(len(p) for p in heavy.logits) == 80
    assert lean.pool.s2.shape == (48, 48)  # d x d, whatever the sample count


def test_samples_stream_to_and_from_an_adm_file(tmp_path):
    from bench.harness.samples import SamplesWriter, load_samples, read_samples, save_samples

    x = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with SamplesWriter(tmp_path / "s.npz", 10, {"dataset": "cifar10"}) as w:
        for s in range(0, 10, 4):
            w.add(x[s:s + 4])
    whole = save_samples(x, tmp_path / "w.npz", {"dataset": "cifar10"})
    with np.load(tmp_path / "s.npz") as a, np.load(whole) as b:  # plain numpy reads the streamed file
        assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].shape == (10, 8, 8, 3)
    n, meta, batches = read_samples(tmp_path / "s.npz", batch_size=3)
    parts = list(batches)
    assert n == 10 and meta == {"dataset": "cifar10"} and [len(p) for p in parts] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(parts), load_samples(whole)[0])
    # a writer that does not get every announced image leaves no file behind
    with pytest.raises(BenchError, match="3 images written, 10 announced"):
        with SamplesWriter(tmp_path / "short.npz", 10, {}) as w:
            w.add(x[:3])
    assert not list(tmp_path.glob("*short*"))
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(BenchError, match="could not read samples"):
        read_samples(tmp_path / "bad.npz")


def test_a_cell_streams_and_scores_what_the_whole_tensor_gives(model_dir, tmp_path, monkeypatch):
    """RTN on a tiny digits model, 10 samples in batches of 4: never one call that samples every image at once,
    scorer batches no larger than the batch size, and the row's numbers equal the whole-tensor computation."""
    from bench.harness.artifacts import ArtifactCache
    from bench.harness.cell import SHARD_DTYPE, CellScoring, mse_vs_fp, run_cell
    from bench.harness.grid import Cell
    from bench.harness.samples import load_samples
    from bench.harness.seeds import sample_seed
    from bench.metrics.score import evaluate
    from bench.models import load_model

    model = load_model(str(model_dir))
    model.dataset = "digits"
    seen = []
    real_add = CellScoring.add
    monkeypatch.setattr(CellScoring, "add", lambda self, s, x: (seen.append(len(x)), real_add(self, s, x))[1])
    metrics = ("digits_fid", "digits_cov", "digits_fid_vs_fp")
    cell = Cell("g", model.name, "rtn", "W4A8", 0, 10, metrics=metrics, overrides={"n_samples": 4}, batch_size=4)
    generate = type(model).generate

    def whole(self, n, seed=0, *a, **k):  # calibration records its N trajectories whole; evaluated samples stream
        if seed == sample_seed(0):
            pytest.fail("a cell sampled every evaluated image at once")
        return generate(self, n, seed, *a, **k)

    monkeypatch.setattr(type(model), "generate", whole)
    row, png = run_cell(model, cell, ArtifactCache(tmp_path / "cache"), [("rtn", {"n_samples": 4})],
                        {"samples_dir": tmp_path / "samples"}, "cpu")
    monkeypatch.setattr(type(model), "generate", generate)
    assert row["status"] == "ok" and seen == [4, 4, 2] and png[:4] == b"\x89PNG"
    # the same numbers from whole tensors: FP samples, the quantized model's samples, evaluate()
    from bench.harness.artifacts import model_fingerprint
    from bench.harness.cell import get_method, shared_trajectories

    cache = ArtifactCache(tmp_path / "cache")
    traj = shared_trajectories(model, model_fingerprint(model), cell, cache, [("rtn", {"n_samples": 4})], "cpu")
    q = get_method("rtn").quantize(model, "W4A8", traj, 0, overrides={"n_samples": 4}, progress=False).unet
    fp = model.to_images(model.generate(10, seed=sample_seed(0), batch_size=4))
    fp = fp.to(SHARD_DTYPE).float()  # as the cache stores them
    qi = model.to_images(model.generate(10, seed=sample_seed(0), unet=q, batch_size=4))
    want = evaluate(qi, "digits", metrics=("digits_fid", "digits_cov"), fp_images=fp, progress=False)
    for k in ("digits_fid", "digits_coverage", "digits_confidence", "digits_fid_vs_fp"):
        assert row[k] == pytest.approx(want[k], rel=1e-6), k
    assert row["mse_vs_fp"] == pytest.approx(mse_vs_fp(qi, fp), rel=1e-6) and row["mse_vs_fp"] > 0
    saved, meta = load_samples(row["samples_file"])
    assert meta["key"] == cell.key and torch.equal(((saved + 1) * 127.5).round(), ((qi + 1) * 127.5).round())


def test_fp_feature_statistics_are_extracted_once_per_seed(model_dir, tmp_path, monkeypatch):
    # Every quantized cell of a seed compares with the same FP samples: their Inception features are extracted
    # once (then read from the artifact cache, also by another worker process), not once per cell.
    from bench.harness.artifacts import ArtifactCache, model_fingerprint
    from bench.harness.cell import fp_feature_stats, fp_images
    from bench.harness.grid import Cell
    from bench.models import load_model

    calls = []

    def counting(u8, *a, **k):
        calls.append(len(u8))
        return _fake_features(u8)

    monkeypatch.setattr("bench.metrics.inception.inception_features", counting)
    model = load_model(str(model_dir))
    cell = Cell("g", model.name, "rtn", "W4A8", 0, 6, batch_size=4)
    fp = model_fingerprint(model)
    for cache in (ArtifactCache(tmp_path), ArtifactCache(tmp_path), ArtifactCache(tmp_path)):
        imgs = fp_images(model, fp, cell, cache, "cpu")
        stats = fp_feature_stats(model, fp, cell, cache, imgs, "cpu", inception=True, digits=True)
    assert calls == [4, 2]  # one pass over the two FP batches, for three cells
    assert stats["pool"][1].shape == (48, 48) and stats["digits"][0].shape == (64,)
