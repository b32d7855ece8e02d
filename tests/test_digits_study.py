"""bench.studies.digits: the study page is computed from its rows: paired verdicts, no conclusion from unconverged
cells, one clean commit, and the progress of the grid."""

import json

import pandas as pd
import pytest

from bench.harness.store import empty_row
from bench.studies import digits as study


def _info(units: int, unconverged: int, iters: int = 500) -> str:
    recon = [{"stage": "fbr", "config": {"iters": 5000, "batch_size": 32}, "units": {
        f"u{i}": {"loss": {"iters": iters, "budget": 5000, "window": 250, "first": 1.0, "last": 0.2, "best": 0.2,
                           "plateaued": i >= unconverged, "curve": [1.0, 0.5, 0.3, 0.25, 0.2]}}
        for i in range(units)}}]
    return json.dumps({"recon": recon, "allocation": None})


def _key(model, method, bits, seed, grid=study.GRID) -> str:
    """The cell key bench.run gives this cell of bench/grids/<grid>.toml."""
    return next(c.key for c in study.planned_cells(grid)
                if (c.model, c.method, c.bits, c.seed) == (model, method, bits, seed))


def _rows(commit="a" * 40, qdiff_unconverged=0, eda_fid=(10.0, 11.0, 12.0), eda_unconverged=0):
    rows = []
    # fid per (method, seed): EDA-DM clearly below RTN on every seed; Q-Diffusion within noise of EDA-DM
    fid = {"rtn": (20.0, 21.5, 23.0), "ptq4dm": (30.0, 31.0, 29.0), "qdiffusion": (9.0, 13.0, 11.5),
           "eda-dm": eda_fid, "eda-dm:tdac-only": (10.5, 11.2, 12.1), "eda-dm:fbr-only": (15.0, 16.0, 17.5)}
    for model in study.MODELS:
        for seed in range(3):
            r = empty_row()
            r.update(grid="digits", model=model, method="fp", bits="FP", w_bits=32, a_bits=32, seed=seed,
                     samples=512, status="ok", error="", cell_key=_key(model, "fp", "FP", seed), run_id="r", git_commit=commit,
                     fid=5.0 + seed, fid_vs_fp=0.0, eps_mse=0.0, quant_seconds=0.0, info="{}",
                     time=pd.Timestamp.now(tz="UTC"))
            rows.append(r)
            for m, v in fid.items():
                r = empty_row()
                units = 0 if m in ("rtn", "ptq4dm") else 4
                bad = {"qdiffusion": qdiff_unconverged, "eda-dm": eda_unconverged}.get(m, 0)
                r.update(grid="digits", model=model, method=m, bits="W4A8", w_bits=4, a_bits=8, seed=seed, samples=512,
                         status="ok", error="", cell_key=_key(model, m, "W4A8", seed), run_id="r", git_commit=commit,
                         fid=v[seed], fid_vs_fp=v[seed] - 4, eps_mse=v[seed] * 1e-3, quant_seconds=60.0,
                         calib_size=1024, info=_info(units, bad) if units else "{}", time=pd.Timestamp.now(tz="UTC"))
                rows.append(r)
    return pd.DataFrame(rows)


def test_page_is_generated_from_the_paired_intervals(tmp_path):
    text = study.render(_rows(), allow_mixed=False, out_dir=tmp_path)
    assert "Rows from commit aaaaaaaaaaaa" in text
    ddpm = text.split("## digits-ddpm")[1].split("## digits-cosine")[0]
    shows = ddpm.split("### What the digits-ddpm rows show")[1]
    w4 = next(ln for ln in shows.splitlines() if ln.startswith("- **W4A8**"))
    # EDA-DM minus RTN on FID: -10.5 each seed -> lower; minus Q-Diffusion: +1, -2, +0.5 -> no difference
    assert "Against RTN: lower on FID -10.50 ± 1.24" in w4
    assert "Against Q-Diffusion: no difference on FID" in w4
    assert "Against FBR only (ablation): lower on FID -5.17 ± 0.72" in w4
    # the table and the loss-curve plot of each reconstructing method
    assert "| EDA-DM | " in ddpm and "0 of 12" in ddpm
    assert (tmp_path / "plots" / "digits-study-digits-ddpm-W4A8-loss.png").is_file()
    assert "The same order on both models." in text
    assert "of 114 planned cells done" in text and "**Not yet run**" in text  # W3A8/W8A8 cells missing


def test_no_conclusion_from_unconverged_cells(tmp_path):
    text = study.render(_rows(qdiff_unconverged=1), allow_mixed=False, out_dir=tmp_path)
    shows = text.split("### What the digits-ddpm rows show")[1]
    w4 = next(ln for ln in shows.splitlines() if ln.startswith("- **W4A8**"))
    assert "Against Q-Diffusion: not judged (Q-Diffusion had unconverged units)" in w4
    assert "(not judged: unconverged units)" in text  # the paired table says so too
    assert "| Q-Diffusion | " in text and "3 of 12" in text  # one unit on each of 3 seeds
    listed = next(ln for ln in text.splitlines() if ln.startswith("- Unconverged, Q-Diffusion W4A8: "))
    assert listed.count("seed ") == 3 and "iterations): loss " in listed
    assert "- Unconverged, EDA-DM" not in text  # its units all plateaued


def test_not_yet_run_names_the_missing_seeds(tmp_path):
    df = _rows()
    df = df[~((df.method == "rtn") & (df.model == "digits-ddpm") & (df.seed == 2))]
    text = study.render(df, allow_mixed=False, out_dir=tmp_path)
    assert "digits-ddpm RTN W4A8 (seed 2)" in text


def test_page_refuses_rows_of_several_commits_unless_told(tmp_path):
    df = _rows()
    df.loc[df.index[:5], "git_commit"] = "b" * 40 + "-dirty"
    with pytest.raises(Exception, match="several commits.*allow-mixed"):
        study.render(df, allow_mixed=False, out_dir=tmp_path)
    text = study.render(df, allow_mixed=True, out_dir=tmp_path)
    assert "mixed commits" in text and "bbbbbbbbbbbb-dirty (5 cells)" in text


def test_rows_of_another_configuration_are_left_out(tmp_path):
    """A cell run with other settings (here: another cell key, as --samples 32 gives) neither counts as done nor
    enters a table."""
    df = _rows()
    sel = (df.method == "rtn") & (df.model == "digits-ddpm")
    df.loc[sel, "cell_key"] = df.loc[sel, "cell_key"] + "-other"
    text = study.render(df, allow_mixed=False, out_dir=tmp_path)
    assert "3 rows of another configuration" in text and "digits-ddpm RTN W4A8 (seeds 0, 1, 2)" in text
    assert "| RTN | " not in text.split("## digits-ddpm")[1].split("## digits-cosine")[0]
    with pytest.raises(Exception, match="none of the"):
        study.render(df[sel], allow_mixed=False, out_dir=tmp_path)


def test_tdac_description_says_when_density_drops_out():
    """At r where every (or no) step pair is within the radius, density is constant and TDAC allocates by
    diversity alone: the page must say so, and must not say it when density discriminates."""
    cfg = {"radius": 3.0}
    degenerate = study._density_regime({"dense_fraction": 1.0, "mse_median": 0.25, "mse_max": 1.55}, cfg)
    assert "100% of step pairs" in degenerate and "diversity alone" in degenerate
    assert "diversity alone" in study._density_regime({"dense_fraction": 0.0, "mse_median": 9, "mse_max": 20}, cfg)
    mixed = study._density_regime({"dense_fraction": 0.81, "mse_median": 0.9, "mse_max": 5.7}, cfg)
    assert "81% of step pairs" in mixed and "diversity alone" not in mixed
    assert study._density_regime({}, cfg) == ""


def _check_rows(commit="a" * 40, fid=None, unconverged=0):
    """Rows of the convergence check (bench/grids/digits-converged.toml): EDA-DM and Q-Diffusion at W4A8."""
    fid = fid or {"eda-dm": (9.0, 10.0, 11.0), "qdiffusion": (12.0, 13.5, 15.0)}
    rows = []
    for model in study.MODELS:
        for seed in range(3):
            for m, v in fid.items():
                r = empty_row()
                r.update(grid=study.CHECK_GRID, model=model, method=m, bits="W4A8", w_bits=4, a_bits=8, seed=seed,
                         samples=512, status="ok", error="", cell_key=_key(model, m, "W4A8", seed, study.CHECK_GRID),
                         run_id="c", git_commit=commit, fid=v[seed], fid_vs_fp=v[seed] - 4, eps_mse=v[seed] * 1e-3,
                         quant_seconds=120.0, calib_size=1024, info=_info(4, unconverged, iters=2000),
                         time=pd.Timestamp.now(tz="UTC"))
                rows.append(r)
    return pd.DataFrame(rows)


def test_convergence_check_judges_what_the_study_could_not(tmp_path):
    """The study's EDA-DM and Q-Diffusion cells have unconverged units (not judged); the check's reruns plateaued
    everywhere, so their comparisons are judged by the same paired rule, in their own section, and the study's
    own verdicts stay 'not judged'."""
    df = pd.concat([_rows(qdiff_unconverged=1, eda_unconverged=1), _check_rows()], ignore_index=True)
    text = study.render(df, allow_mixed=False, out_dir=tmp_path)
    assert "29 cells" not in text and "+ 12 of its convergence check" in text
    main, check = text.split("## Convergence check: every unit run to its plateau")
    assert "Against RTN: not judged (EDA-DM had unconverged units)" in main  # the study's verdict is unchanged
    assert "12 of 12 planned cells done" in check
    sec = check.split("### digits-ddpm W4A8")[1].split("### digits-cosine W4A8")[0]
    w4 = next(ln for ln in sec.splitlines() if ln.startswith("- **W4A8**"))
    # EDA-DM, longer cap minus RTN on FID: 9-20, 10-21.5, 11-23 -> -11.5 +- ...: lower; minus the rerun Q-Diffusion:
    # -3, -3.5, -4 -> lower
    assert w4.startswith("- **W4A8** (EDA-DM, longer cap minus the other, 3 paired seeds)")
    assert "Against RTN: lower on FID -11.50" in w4
    assert "Against Q-Diffusion, activations to plateau: lower on FID -3.50 ± 1.24" in w4
    assert "| EDA-DM, longer cap | " in sec and "| Q-Diffusion, activations to plateau | " in sec
    # what the longer budget changed, paired: EDA-DM rerun minus study: -1 on every seed
    effect = next(ln for ln in sec.splitlines() if ln.startswith("| EDA-DM, longer cap minus EDA-DM |"))
    assert "-1.00 ± 0.00 (lower)" in effect
    assert (tmp_path / "plots" / "digits-study-digits-ddpm-W4A8-loss-check.png").is_file()
    # the budget section lists the reruns' caps as run
    assert "| EDA-DM, longer cap | W4A8 | 1024 | fbr 5000 | 2000 / 2000 / 2000 | 0 of 12 |" in text


def test_convergence_check_with_unconverged_units_is_not_judged(tmp_path):
    df = pd.concat([_rows(), _check_rows(unconverged=1)], ignore_index=True)
    check = study.render(df, allow_mixed=False, out_dir=tmp_path).split("## Convergence check")[1]
    assert "Against RTN: not judged (EDA-DM, longer cap had unconverged units)" in check


def test_convergence_check_must_share_the_study_commit(tmp_path):
    """The check pairs with the study's FP/RTN/PTQ4DM cells, so its rows must come from the same commit."""
    df = pd.concat([_rows(), _check_rows(commit="c" * 40)], ignore_index=True)
    with pytest.raises(Exception, match="several commits"):
        study.render(df, allow_mixed=False, out_dir=tmp_path)


def test_effect_line_counts_units_that_reconstruction_improved_per_stage():
    """A unit counts as improved only when its output MSE fell (after < before), per stage; a curve that rose (an
    AdaRound stage hardening its rounding) is counted apart, so a plateau verdict on it is not read as improvement."""
    def unit(stage, before, after, first=1.0, last=0.5):
        return {"stage": stage, "unit": "u", "first": first, "last": last, "mse_before": before, "mse_after": after}

    units = [unit("weights", 0.2, 0.1, last=3.0), unit("weights", 0.2, 0.15), unit("activations", 0.1, 0.12),
             unit("activations", 0.1, 0.05, last=1.2), unit("activations", 0.1, None)]
    (line,) = study.effect_lines("Q-Diffusion W4A8", units)
    assert "lower after reconstruction than before in 3 of 4 units (weights 2 of 2, activations 1 of 2)" in line
    assert "ending above their first window: weights 1, activations 1" in line
    (single,) = study.effect_lines("EDA-DM W4A8", [unit("fbr", 0.2, 0.1), unit("fbr", 0.2, 0.3)])
    assert "in 1 of 2 units;" not in single and single.endswith("in 1 of 2 units.")
    assert study.effect_lines("RTN W4A8", [unit("fbr", None, None)]) == []
