"""Catalogue of bad inputs and safe loading: each bad input ends in ONE line on stderr,
`error: ...`, no traceback, exit 2 for usage errors and 1 for other errors.

Most cases call the CLIs' `main(argv)` in-process (they are wrapped with `bench.errors.cli_main`, which prints the
line and raises SystemExit); a few run the real `python -m bench.X` as a subprocess to prove the same holds end to
end (interpreter start-up, no stray warnings turned into tracebacks). Cases already covered elsewhere are not
repeated: NaN naming the unit in eda.recon (tests/test_recon.py), checkpoint layer/shape mismatches
(tests/test_checkpoint.py), zoo availability messages per model (tests/test_zoo.py).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError, UsageError

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def run_cli(module: str, *argv: str, env: dict | None = None, timeout: int = 120) -> tuple[int, str]:
    """Run `python -m module argv...`; returns (exit code, stderr)."""
    p = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=env or _env(), capture_output=True,
                       text=True, timeout=timeout, check=False)
    return p.returncode, p.stderr


def one_error_line(err: str) -> str:
    """The stderr of a failed CLI: no traceback, and exactly one line starting with 'error: ', the last one (stage
    lines such as bench.quantize's '[1/3] recording ...' and progress bars may come before it)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(re.match(r"\[\d/\d\] ", ln) or "%|" in ln for ln in lines[:-1]), err
    return errors[0]


def call(main, argv, capsys) -> tuple[int, str]:
    """Call a CLI main in-process; returns (exit code, the one error line)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, one_error_line(capsys.readouterr().err)


# ---- tiny model directory and saved quantized checkpoints ---------------------------------------------------------

@pytest.fixture(scope="module")
def qdir(model_dir, tmp_path_factory):
    """A quantized W8A8 model saved with eda.checkpoint.save_quantized whose metadata points at model_dir."""
    from eda.checkpoint import save_quantized
    from eda.policy import BitPolicy
    from eda.trajectories import CalibSet
    from eda.wrap import init_ranges, quantize_unet
    from tests.conftest import make_tiny_unet

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    q = quantize_unet(make_tiny_unet(width=8), BitPolicy.from_bits("W8A8", w_init="minmax", a_init="minmax"))
    init_ranges(q, CalibSet(x, t), batch_size=4)
    d = tmp_path_factory.mktemp("q") / "ck"
    save_quantized(q, d, {"model": str(model_dir), "method": "rtn", "bits": "W8A8"})
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- unknown names and bit specs (usage errors, exit 2) -----------------------------------------------------------

def test_unknown_model_subprocess(tmp_path):
    """The real CLIs as subprocesses: one line, exit 2, the bad name quoted."""
    code, err = run_cli("bench.quantize", "--model", "nope", "--method", "rtn", "--out", str(tmp_path / "q"))
    assert code == 2 and "'nope'" in one_error_line(err)
    code, err = run_cli("bench.sample", "--model", "nope", "--out", str(tmp_path / "g.png"))
    assert code == 2 and "'nope'" in one_error_line(err)
    assert not (tmp_path / "q").exists()


def test_unknown_grid_subprocess():
    code, err = run_cli("bench.run", "--grid", "nope", "--dry-run")
    line = one_error_line(err)
    assert code == 2 and "unknown grid 'nope'" in line and "smoke" in line  # lists the shipped grids


def test_unknown_method(capsys, tmp_path):
    from bench.quantize import main

    code, line = call(main, ["--model", "digits-ddpm", "--method", "nope", "--out", str(tmp_path)], capsys)
    assert code == 2 and "'nope'" in line and "eda-dm" in line  # names the known methods
    from bench.run import main as run_main

    code, line = call(run_main, ["--grid", "smoke", "--methods", "fp,nope", "--dry-run", "--out", str(tmp_path)],
                      capsys)
    assert code == 2 and "nope" in line and "eda-dm" in line


@pytest.mark.parametrize("bits", ["W4", "W1A8", "W17A8", "W4A1", "W4A17", "A8W4", "W4A"])
def test_bad_bits_quantize(bits, capsys, tmp_path):
    from bench.quantize import main

    code, line = call(main, ["--model", "digits-ddpm", "--method", "rtn", "--bits", bits, "--out", str(tmp_path)],
                      capsys)
    assert code == 2 and bits in line
    assert "W<bits>A<bits>" in line or "2..16" in line  # says what is expected


@pytest.mark.parametrize("bits", ["W4", "W1A8", "W17A8"])
def test_bad_bits_run(bits, capsys, tmp_path):
    from bench.run import main

    code, line = call(main, ["--grid", "smoke", "--bits", f"W8A8,{bits}", "--dry-run", "--out", str(tmp_path)],
                      capsys)
    assert code == 2 and bits in line


@pytest.mark.parametrize("variants, expect", [
    ("base,threads=two", "bad variant 'threads=two'"),
    ("base,isa=neon", "isa=avx2|default"),
    ("batch=16", "must start with base"),
])
def test_bad_noise_variants(variants, expect, capsys, tmp_path):
    from bench.studies.noise import main

    code, line = call(main, ["--variants", variants, "--out", str(tmp_path)], capsys)
    assert code == 2 and expect in line


def test_noise_render_without_a_measurement(capsys, tmp_path):
    from bench.studies.noise import main

    code, line = call(main, ["--render-only", "--out", str(tmp_path)], capsys)
    assert code == 1 and "python -m bench.noise" in line


@pytest.mark.parametrize("argv, expect", [
    (["--rel-tol", "digits_coverage=0.5"], "bounded in [0, 1]"),
    (["--rel-tol", "fid=x"], "must be a number"),
    (["--rel-tol", "0.1", "--rel-tol", "fid=0.2"], "not both"),
])
def test_bad_check_tolerances(argv, expect, capsys, tmp_path):
    import pandas as pd

    from bench.check import main
    from bench.harness.store import empty_row, write_file, write_row

    r = empty_row()
    r.update(grid="smoke", model="m", method="fp", bits="FP", seed=0, status="ok", cell_key="k", digits_fid=1.0,
             digits_coverage=1.0, time=pd.Timestamp.now(tz="UTC"))
    ref = write_file(pd.DataFrame([r]), tmp_path / "ref.parquet")
    write_row(tmp_path / "runs", r)
    code, line = call(main, ["--baseline", str(ref), "--out", str(tmp_path), *argv], capsys)
    assert code == 2 and expect in line


BLOCK = '[[model]]\nname = "digits-ddpm"\nmethods = ["fp"]\nbits = ["W8A8"]\nseeds = [0]\nsamples = 4\n'


@pytest.mark.parametrize("text, expect", [
    ('name = "x"\n[defaults\nmethods = ["fp"]\n', "not valid TOML"),
    ('name = "x"\ncolour = "red"\n' + BLOCK, "unknown top-level keys"),
    (BLOCK + "sampels = 8\n", "sampels"),
    (BLOCK.replace("W8A8", "W4"), "W4"),
])
def test_malformed_grid_file(text, expect, capsys, tmp_path):
    from bench.run import main

    p = tmp_path / "g.toml"
    p.write_text(text)
    code, line = call(main, ["--grid", str(p), "--dry-run", "--out", str(tmp_path)], capsys)
    assert code == 2 and expect in line
    assert str(p) in line or expect == "W4"  # names the file (bit errors name the bad setting)


# ---- corrupt or mismatched saved quantized models (exit 1) --------------------------------------------------------

def test_saved_model_samples(qdir, capsys, tmp_path):
    """Control: the intact checkpoint samples, so the failures below come from the damage, not the fixture."""
    from bench.sample import main

    assert main(["--model", str(qdir), "--n", "2", "--out", str(tmp_path / "g.png"), "--quiet"]) == 0


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_checkpoint(qdir, keep, capsys, tmp_path):
    from bench.sample import main
    from eda.checkpoint import WEIGHTS_FILE

    d = _copy(qdir, tmp_path / "ck")
    w = d / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[: int(w.stat().st_size * keep)])
    code, line = call(main, ["--model", str(d), "--n", "2", "--out", str(tmp_path / "g.png"), "--quiet"], capsys)
    assert code == 1 and "corrupt" in line and str(d) in line and "re-save" in line


def test_corrupt_json_config(qdir, capsys, tmp_path):
    from bench.sample import main
    from eda.checkpoint import CONFIG_FILE

    d = _copy(qdir, tmp_path / "ck")
    (d / CONFIG_FILE).write_text((d / CONFIG_FILE).read_text()[:100])
    code, line = call(main, ["--model", str(d), "--n", "2", "--out", str(tmp_path / "g.png"), "--quiet"], capsys)
    assert code == 1 and "corrupt" in line and str(d) in line


def test_config_bits_do_not_match_weights(qdir, capsys, tmp_path):
    """The JSON says 4-bit weights but the safetensors holds 8-bit codes: refuse, rather than unpack garbage."""
    from bench.sample import main
    from eda.checkpoint import CONFIG_FILE

    d = _copy(qdir, tmp_path / "ck")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    layer = next(n for n, info in cfg["layers"].items() if info["parts"][0]["bits"] == 8)
    cfg["layers"][layer]["parts"][0]["bits"] = 4
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    code, line = call(main, ["--model", str(d), "--n", "2", "--out", str(tmp_path / "g.png"), "--quiet"], capsys)
    assert code == 1 and "does not match" in line and layer in line and "re-save" in line


def test_missing_base_model_of_a_checkpoint(qdir, capsys, tmp_path):
    """The checkpoint names an FP model that is not registered here: usage error naming the model."""
    from bench.sample import main
    from eda.checkpoint import CONFIG_FILE

    d = _copy(qdir, tmp_path / "ck")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg["meta"]["model"] = "no-such-model"
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    code, line = call(main, ["--model", str(d), "--n", "2", "--out", str(tmp_path / "g.png"), "--quiet"], capsys)
    assert code == 2 and "no-such-model" in line


# ---- missing weights offline (exit 1, names the download) ---------------------------------------------------------

def test_paper_model_offline_subprocess(tmp_path):
    """cifar10-ddim with an empty HF cache and an empty model root: one line naming the hub id and the folder."""
    empty = tmp_path / "models"
    empty.mkdir()
    env = _env(HF_HOME=str(tmp_path / "hf"), EDA_BENCH_MODELS=str(empty), EDA_BENCH_CACHE=str(tmp_path / "cache"))
    code, err = run_cli("bench.quantize", "--model", "cifar10-ddim", "--method", "rtn", "--bits", "W8A8", "--out",
                        str(tmp_path / "q"), "--quiet", env=env)
    line = one_error_line(err)
    assert code == 1 and "google/ddpm-cifar10-32" in line and "EDA_BENCH_MODELS" in line
    assert "--model-dir" not in line  # no CLI has such a flag
    assert not (tmp_path / "q").exists()


def test_missing_reference_statistics_offline(model_dir, tmp_path, monkeypatch, capsys):
    """FID against a dataset whose reference images/statistics are not here: one line naming the folder and the
    variable to set (exit 1), before sampling, not a traceback from the extractor."""
    import bench.evaluate
    from bench.evaluate import main

    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the reference data")

    monkeypatch.setattr(bench.evaluate, "sample_images", no_sampling)

    d = tmp_path / "cifar-like"
    d.mkdir()
    (d / "unet").symlink_to(model_dir / "unet")
    meta = json.loads((model_dir / "bench.json").read_text())
    (d / "bench.json").write_text(json.dumps({**meta, "dataset": "cifar10"}))
    monkeypatch.setenv("EDA_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDA_BENCH_DATA", str(tmp_path / "data"))
    code, line = call(main, ["--model", str(d), "--n", "2", "--steps", "2", "--metrics", "fid", "--threads", "1"],
                      capsys)
    assert code == 1 and "no reference images for cifar10" in line and "EDA_BENCH_DATA" in line
    assert "--reference-dir" in line
    assert str(tmp_path / "data") in line


# ---- metrics and reconstruction -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 16, 16), (4, 2, 16, 16), (4, 16, 16, 3), (2, 4, 1, 16, 16)])
def test_metrics_wrong_image_shape(shape):
    from bench.metrics.score import evaluate

    with pytest.raises(UsageError) as e:
        evaluate(torch.zeros(shape), "digits", metrics=("digits_fid",))
    assert "\n" not in str(e.value) and "shape" in str(e.value)


def test_nan_in_reconstruction_cli(model_dir, tmp_path, capsys):
    """NaN through the CLI: a UNet whose weights hold a NaN fails while recording FP trajectories, with one line
    blaming the FP model (not a reconstruction learning rate), exit 1. NaN inside reconstruction naming the unit is
    tests/test_recon.py::test_nan_names_the_unit."""
    from bench.models.directory import load_unet_dir
    from bench.quantize import main

    bad = tmp_path / "nan-model"
    unet = load_unet_dir(model_dir).unet
    with torch.no_grad():
        unet.up_blocks[0].resnets[0].conv2.weight[0, 0, 0, 0] = float("nan")
    unet.save_pretrained(bad / "unet")
    (bad / "bench.json").write_text((model_dir / "bench.json").read_text())
    code, line = call(main, ["--model", str(bad), "--method", "eda-dm", "--bits", "W8A8", "--out",
                             str(tmp_path / "q"), "--set", "n_samples=4", "--set", "iters=1", "--set",
                             "batch_size=4", "--set", "init_batch=4", "--set", "w_init=minmax", "--set",
                             "a_init=minmax", "--quiet", "--threads", "1"], capsys)
    assert code == 1 and "full-precision model" in line and "non-finite" in line and "checkpoint" in line
    assert not (tmp_path / "q").exists()


# ---- safe loading (2d) --------------------------------------------------------------------------------------------

def _sources():
    for pkg in ("bench", "eda", "baselines"):
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_every_torch_load_is_weights_only():
    """No unrestricted pickle: every torch.load call in the package passes weights_only=True."""
    calls = []
    for f in _sources():
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            # the call's argument list: up to the matching parenthesis
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            line = text.count("\n", 0, m.start()) + 1
            if text[:m.start()].rsplit("\n", 1)[-1].lstrip().startswith("#"):
                continue
            calls.append((f"{f.relative_to(ROOT)}:{line}", text[m.end():i - 1]))
    # the docstring of bench/convert.py mentions `torch.load(weights_only=True)` as well; all must pass
    assert calls, "expected at least the .ckpt converter's torch.load"
    bad = [where for where, args in calls if not re.search(r"\bweights_only\s*=\s*True\b", args)]
    assert not bad, f"torch.load without weights_only=True at {bad}"
    assert not any("pickle.load" in f.read_text() for f in _sources())


def test_artifact_cache_round_trip_is_weights_only(tmp_path):
    """The shared FP artifact cache reads its files with weights_only=True: trajectories and sample dicts come back
    from disk; a file holding any other pickled object is refused with one line naming the file."""
    from bench.harness.artifacts import ArtifactCache
    from eda.trajectories import record_trajectories
    from tests.conftest import make_tiny_model

    traj = record_trajectories(make_tiny_model(steps=2, width=8), 2, seed=0, batch_size=2)
    ArtifactCache(tmp_path).get("trajectories", {"a": 1}, lambda: traj)
    ArtifactCache(tmp_path).get("fp_samples", {"a": 1}, lambda: {"x0": torch.ones(2), "seconds": 1.0})
    fresh = ArtifactCache(tmp_path)
    back = fresh.get("trajectories", {"a": 1}, lambda: pytest.fail("recomputed"))
    assert torch.equal(back.xs, traj.xs) and back.sampler == traj.sampler
    assert fresh.get("fp_samples", {"a": 1}, lambda: pytest.fail("recomputed"))["seconds"] == 1.0
    assert fresh.hits["disk"] == 2
    evil = ArtifactCache(tmp_path)
    torch.save({"x": Path("/")}, tmp_path / "fp_samples" / f"{evil.key('fp_samples', {'b': 1})}.pt")
    with pytest.raises(BenchError, match="cached artifact .* delete it") as e:
        evil.get("fp_samples", {"b": 1}, lambda: None)
    assert "\n" not in str(e.value)


def test_local_ray_cluster_has_no_dashboard():
    text = (ROOT / "bench" / "harness" / "driver.py").read_text()  # start_ray
    inits = re.findall(r"ray\.init\(([^)]*)\)", text)
    local = [a for a in inits if 'address="local"' in a]
    assert local and all("include_dashboard=False" in a for a in local)
    # Ray's token authentication is never switched off by the harness
    for f in _sources():
        assert "RAY_AUTH_MODE" not in f.read_text() or "disabled" not in f.read_text(), f


@pytest.mark.parametrize("damage", ["truncate", "empty-dir", "no-weights"])
def test_damaged_diffusers_directory(model_dir, damage, capsys, tmp_path):
    """A plain diffusers UNet directory (not a quantized one) that is truncated, empty or lacks its weights."""
    from bench.sample import main

    d = tmp_path / "m"
    d.mkdir()
    if damage != "empty-dir":
        _copy(model_dir / "unet", d / "unet")
        (d / "bench.json").write_text((model_dir / "bench.json").read_text())
        w = next((d / "unet").glob("*.safetensors"))
        if damage == "truncate":
            w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
        else:
            w.unlink()
    code, line = call(main, ["--model", str(d), "--n", "2", "--out", str(tmp_path / "g.png"), "--quiet"], capsys)
    assert code == 1 and str(d) in line and ("re-save" in line or "save_pretrained" in line)
