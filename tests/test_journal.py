"""Resumable reconstruction (eda.journal): a quantization interrupted after some units resumes from the next unit
and ends exactly where an uninterrupted run ends (same process, same kernels: bit-exact); journals written for
another quantization, and corrupt entries, are not trusted; the harness cell and `bench.quantize` resume and then
remove their journal."""

import pytest
import torch

import eda.recon as recon
from eda.journal import Journal
from eda.registry import get_method
from eda.units import reconstruction_units
from tests.conftest import make_tiny_model, tiny
from tests.conftest_ray import ray_session  # noqa: F401 - the session-wide Ray cluster

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation


_RECONSTRUCT_UNIT = recon._reconstruct_unit


class Interrupted(Exception):
    """Stands for the process being killed mid-quantization."""


def _count_units(monkeypatch, stop_after: int | None = None) -> list[str]:
    """Wrap the unit reconstruction: the returned list records the units reconstructed (not restored) in this run;
    with `stop_after`, the run is interrupted when that many units are done."""
    calls: list[str] = []
    real = _RECONSTRUCT_UNIT

    def wrapped(qmodel, fp_unet, unit, *args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupted(unit.name)
        calls.append(unit.name)
        return real(qmodel, fp_unet, unit, *args, **kwargs)

    monkeypatch.setattr(recon, "_reconstruct_unit", wrapped)
    return calls


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(steps=6, width=8)


@pytest.fixture(scope="module")
def trajectories(model):
    from eda.trajectories import mid_attention_name, record_trajectories

    return record_trajectories(model, 12, seed=123, feature_modules=(mid_attention_name(model.unet),), batch_size=24)


def _same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 500, 990])
    with torch.no_grad():
        assert torch.equal(a(x, t).sample, b(x, t).sample)


def _units(res) -> dict:
    """Every unit's report by (stage, unit), without its seconds: a restored unit reports the seconds it took when
    it was reconstructed, which differ from run to run."""
    return {(s["stage"], n): {k: v for k, v in u.items() if k != "seconds"}
            for s in res.info["recon"] for n, u in s["units"].items()}


@pytest.mark.parametrize("method,where", [("eda-dm", 0.5), ("qdiffusion", 1.25)])
def test_an_interrupted_quantization_resumes_and_ends_where_an_uninterrupted_one_does(
        model, trajectories, tmp_path, monkeypatch, method, where):
    """EDA-DM (one stage: weights and activations with the FBR loss) interrupted halfway; Q-Diffusion (AdaRound
    weight stage, then the activation stage) interrupted inside its second stage."""
    m = get_method(method)
    kw = tiny(method, iters=3)
    full = m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False)
    n_units = len(reconstruction_units(full.unet))
    total = sum(len(s["units"]) for s in full.info["recon"])
    assert total == n_units * (2 if method == "qdiffusion" else 1)

    stop = int(n_units * where)
    journal = Journal(tmp_path / "j", context="test")
    _count_units(monkeypatch, stop_after=stop)
    with pytest.raises(Interrupted):
        m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False, journal=journal)

    calls = _count_units(monkeypatch)
    resumed = m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False,
                         journal=Journal(tmp_path / "j", context="test"))
    assert resumed.info["restored_units"] == stop and len(calls) == total - stop  # nothing done twice
    _same_model(resumed.unet, full.unet)
    assert _units(resumed) == _units(full)  # reports too: loss summaries, MSE before/after (seconds aside)
    if method == "qdiffusion":  # the restored weight stage left AdaRound, hardened, where the full run has it
        from eda.adaround import AdaRoundQuantizer

        ada = [q for q in resumed.unet.modules() if isinstance(q, AdaRoundQuantizer)]
        assert ada and not any(q.soft_targets for q in ada)


def test_a_journal_for_another_quantization_is_discarded(model, trajectories, tmp_path, monkeypatch):
    m = get_method("eda-dm")
    kw = tiny("eda-dm", iters=2)
    _count_units(monkeypatch, stop_after=3)
    with pytest.raises(Interrupted):
        m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False, journal=Journal(tmp_path / "j"))
    calls = _count_units(monkeypatch)
    # another seed (other calibration batches): nothing of the journal applies
    res = m.quantize(model, "W4A8", trajectories, seed=1, overrides=kw, progress=False,
                     journal=Journal(tmp_path / "j"))
    assert res.info["restored_units"] == 0 and len(calls) == sum(len(s["units"]) for s in res.info["recon"])
    # other code (the context the harness fills with the commit): discarded as well
    calls.clear()
    res = m.quantize(model, "W4A8", trajectories, seed=1, overrides=kw, progress=False,
                     journal=Journal(tmp_path / "j", context="other-commit"))
    assert res.info["restored_units"] == 0 and calls


def test_a_corrupt_entry_is_reconstructed_again_with_every_unit_after_it(model, trajectories, tmp_path,
                                                                         monkeypatch):
    m = get_method("eda-dm")
    kw = tiny("eda-dm", iters=2)
    full = m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False)
    _count_units(monkeypatch, stop_after=4)
    with pytest.raises(Interrupted):
        m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False, journal=Journal(tmp_path / "j"))
    stage_dir = next(p for p in (tmp_path / "j").iterdir() if p.is_dir())
    (stage_dir / "0001.safetensors").write_bytes(b"truncated")  # unit 2 of 4 unreadable
    calls = _count_units(monkeypatch)
    res = m.quantize(model, "W4A8", trajectories, overrides=kw, progress=False, journal=Journal(tmp_path / "j"))
    assert res.info["restored_units"] == 1  # unit 1 only: units 3 and 4 were built on unit 2
    assert len(calls) == sum(len(s["units"]) for s in full.info["recon"]) - 1
    _same_model(res.unet, full.unet)


def test_a_harness_cell_resumes_its_reconstruction_and_then_removes_the_journal(model_dir, tmp_path, monkeypatch):
    from bench.harness.artifacts import ArtifactCache
    from bench.harness.cell import run_cell
    from bench.harness.grid import Cell
    from bench.models import load_model

    model = load_model(str(model_dir))
    kw = tiny("eda-dm", iters=2)
    cell = Cell("g", model.name, "eda-dm", "W4A8", 0, 8, overrides=kw, batch_size=4)
    requests = [("eda-dm", kw)]
    plain, _ = run_cell(model, cell, ArtifactCache(tmp_path / "a"), requests, {}, "cpu")

    cache = ArtifactCache(tmp_path / "b")
    _count_units(monkeypatch, stop_after=2)
    with pytest.raises(Interrupted):
        run_cell(model, cell, cache, requests, {}, "cpu")
    assert any((cache.root / "journals" / cell.key).rglob("*.safetensors"))
    calls = _count_units(monkeypatch)
    row, _ = run_cell(model, cell, cache, requests, {}, "cpu")
    import json

    info = json.loads(row["info"])
    assert info["restored_units"] == 2 and calls and json.loads(plain["info"])["restored_units"] == 0
    assert row["eps_mse"] == plain["eps_mse"] and row["mse_vs_fp"] == plain["mse_vs_fp"]
    assert not (cache.root / "journals" / cell.key).exists()  # done: the journal is gone


def test_bench_quantize_resumes_an_interrupted_run(model_dir, tmp_path, monkeypatch, capsys):
    from bench.quantize import main

    out = tmp_path / "q"
    argv = ["--model", str(model_dir), "--method", "eda-dm", "--bits", "W4A8", "--out", str(out), "--quiet",
            "--set", "n_samples=8", "--set", "iters=2", "--set", "batch_size=4", "--set", "init_batch=8", "--threads", "1"]
    _count_units(monkeypatch, stop_after=2)
    with pytest.raises(Interrupted):
        main(argv)
    assert (out / "journal").is_dir()
    _count_units(monkeypatch)
    assert main(argv) == 0
    assert "resumed: 2 reconstructed units restored" in capsys.readouterr().err
    assert (out / "quant_config.json").is_file() and not (out / "journal").exists()


def test_a_worker_killed_mid_reconstruction_is_retried_from_its_last_unit(ray_session, tmp_path):  # noqa: F811
    """Through the whole harness: the worker process dies after two reconstructed units; Ray restarts it, the
    driver retries the cell, and the retry restores the two units and ends with the results of a run that was never
    interrupted."""
    import json

    from bench.harness.store import read_runs
    from tests.test_run import run, write_grid

    rows = {}
    for name, crash in (("crashed", True), ("whole", False)):
        marker = tmp_path / f"{name}.marker"
        if not crash:
            marker.touch()  # the marker exists: this run never dies
        extra = (f'[method."test-eda-crash"]\nmarker = "{marker}"\ncrash_after = 2\nn_samples = 8\ninit_batch = 8\n'
                 f'iters = 2\nbatch_size = 4\n')
        (tmp_path / name).mkdir()
        grid = write_grid(tmp_path / name, ["test-eda-crash"], bits=("W4A8",), extra=extra)
        assert run("--grid", grid, "--out", str(tmp_path / name / "out"), "--retries", "1") == 0
        rows[name] = read_runs(tmp_path / name / "out" / "runs").iloc[0]
        assert not list((tmp_path / name / "out" / "cache" / "journals").rglob("*.json"))  # removed when done
    crashed, whole = rows["crashed"], rows["whole"]
    assert (tmp_path / "crashed.marker").exists() and crashed["status"] == "ok" and crashed["attempts"] == 2
    assert json.loads(crashed["info"])["restored_units"] == 2 and json.loads(whole["info"])["restored_units"] == 0
    assert whole["attempts"] == 1
    assert crashed["eps_mse"] == whole["eps_mse"] and crashed["mse_vs_fp"] == whole["mse_vs_fp"]


def test_a_journal_cleared_under_a_running_quantization_is_recreated(tmp_path):
    """Two attempts of one cell can overlap (a Ray call reported lost that still finishes): the one that finishes
    first clears the journal, and the other's next unit must still be journalled, not fail the cell."""
    j = Journal(tmp_path / "j").open({"m": 1}, {})
    stage = j.stage("s")
    stage.save(0, "u0", {"a_quantizer.delta": torch.ones(2)}, {"seconds": 1.0})
    j.clear()
    stage.save(1, "u1", {"a_quantizer.delta": torch.zeros(2)}, {"seconds": 2.0})
    assert stage.load(1, "u1").report == {"seconds": 2.0} and stage.load(0, "u0") is None
