"""Method registry, knob resolution, calibration selection and method-specific behaviour on a tiny random UNet
(seconds each); every method end to end: tests/test_contract.py."""

from dataclasses import replace

import pytest
import torch

from bench.errors import UsageError
from bench.models import DiffusionModel
from eda.registry import available_methods, get_method, parse_overrides
from tests.conftest import make_tiny_model, tiny

torch.set_num_threads(2)

ALL = ["fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm", "eda-dm:tdac-only", "eda-dm:fbr-only"]


def tiny_model(seed: int = 0, steps: int = 6) -> DiffusionModel:
    """The method tests' model: the tiny UNet at width 8 (tests/conftest.py) with a 6-step quad DDIM sampler."""
    return make_tiny_model(steps=steps, seed=seed, width=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def trajectories(model):
    from eda.trajectories import mid_attention_name, record_trajectories

    return record_trajectories(model, 12, seed=123, feature_modules=(mid_attention_name(model.unet),), batch_size=24)


# ---- registry and knobs -------------------------------------------------------------------------------------------
def test_all_methods_registered():
    assert set(ALL) <= set(available_methods())


def test_unknown_method_lists_names():
    with pytest.raises(UsageError, match="eda-dm"):
        get_method("brecq")


def test_unknown_knob_lists_valid_ones():
    with pytest.raises(UsageError, match="valid: .*lam"):
        get_method("eda-dm").configure(None, "W4A8", {"lamda": 1.0})


def test_string_overrides_are_coerced():
    m = get_method("eda-dm").configure(None, "W8A8", parse_overrides(
        ["iters=10", "lam=0.5", "tdac_batch=none", "split_shortcut=false", "lr_w=1e-3"]))
    assert (m.iters, m.lam, m.tdac_batch, m.split_shortcut, m.lr_w, m.lr_a) == (10, 0.5, None, False, 1e-3, 1e-3)
    with pytest.raises(UsageError, match="expects int"):
        get_method("eda-dm").configure(None, "W8A8", {"iters": "ten"})
    with pytest.raises(UsageError, match="key=value"):
        parse_overrides(["iters"])


def test_lr_table_by_bits():
    m = get_method("eda-dm")
    assert (m.configure(None, "W8A8").lr_w, m.configure(None, "W8A8").lr_a) == (5e-2, 1e-3)
    assert (m.configure(None, "W4A8").lr_w, m.configure(None, "W4A8").lr_a) == (5e-1, 5e-4)
    assert m.configure(None, "W3A8").lr_w == 5e-1 and m.configure(None, "W6A6").lr_w == 5e-2


def test_iters_scale():
    m = get_method("eda-dm").configure(None, "W4A8", {"iters_scale": 0.01})
    assert m.scaled(m.iters) == 50 and m.scaled(1) == 1
    with pytest.raises(UsageError):
        get_method("rtn").configure(None, "W4A8", {"iters_scale": 0})


def test_model_defaults_resolution(model):
    md = replace(model, defaults={"radius": 0.3, "cali_n": 9, "eda-dm": {"lam": 1.0, "W4A8": {"lr_w": 1e-2}}})
    m = get_method("eda-dm:tdac-only").configure(md, "W4A8", {"lam": 2.0})
    assert (m.radius, m.lam, m.lr_w, m.lr_a) == (0.3, 2.0, 1e-2, 5e-4)  # override > model > table
    assert get_method("eda-dm").configure(md, "W8A8").lr_w == 5e-2
    assert get_method("qdiffusion").configure(md, "W8A8").cali_n == 9
    with pytest.raises(UsageError, match="unknown knob"):
        get_method("eda-dm").configure(replace(model, defaults={"eda-dm": {"lamda": 1}}), "W4A8")


def test_ablations_differ_in_one_knob():
    base = get_method("eda-dm").knobs()
    for name, (k, v) in {"eda-dm:tdac-only": ("loss", "mse"), "eda-dm:fbr-only": ("calibration", "uniform")}.items():
        diff = {key: val for key, val in get_method(name).knobs().items() if base[key] != val}
        assert diff == {k: v}


def test_calibration_requests(model):
    n, feats = get_method("eda-dm").calibration_request(model)
    assert n == 1024 and feats == ("mid_block.attentions.0",)
    assert get_method("eda-dm:fbr-only").calibration_request(model) == (1024, ())
    assert get_method("qdiffusion").calibration_request(model, {"cali_n": 7}) == (7, ())
    assert get_method("ptq4dm").calibration_request(model)[0] == 1024
    assert get_method("fp").calibration_request(model) == (0, ())


# ---- calibration selection ----------------------------------------------------------------------------------------
def test_tdac_selection_one_sample_per_trajectory(model, trajectories):
    m = get_method("eda-dm").configure(model, "W4A8", tiny("eda-dm"))
    calib, alloc, extra = m.select(model, trajectories, seed=0)
    assert len(calib) == 8 and sum(alloc) == 8 and len(alloc) == trajectories.steps
    assert set(extra["tdac"]) >= {"density_norm", "diversity_norm", "dense_fraction"}
    # every selected x_t is trajectory i's state at some step, no trajectory used twice
    used = []
    for x in calib.xs:
        hits = (trajectories.xs.float() == x).flatten(2).all(-1).nonzero()
        assert len(hits) >= 1
        used.append(int(hits[0, 1]))
    assert len(set(used)) == 8


def test_qdiffusion_selection_is_steps_by_samples(model, trajectories):
    m = get_method("qdiffusion").configure(model, "W4A8", tiny("qdiffusion"))
    calib, alloc, _ = m.select(model, trajectories, seed=0)
    S = trajectories.steps
    steps = list(range(0, S, S // 2))
    assert len(calib) == 4 * len(steps)
    assert [i for i, c in enumerate(alloc) if c] == steps and set(alloc) <= {0, 4}


def test_ptq4dm_official_variant_selection(model, trajectories):
    m = get_method("ptq4dm").configure(model, "W8A8", tiny("ptq4dm", ndtc="official"))
    calib, alloc, extra = m.select(model, trajectories, seed=0)
    assert len(calib) == sum(alloc) == 8 - extra["ndtc_dropped"] > 0  # out-of-range draws are dropped
    paper = get_method("ptq4dm").configure(model, "W8A8", tiny("ptq4dm", ndtc="paper"))
    assert len(paper.select(model, trajectories, seed=0)[0]) == 8  # clamped: every draw kept


def test_too_few_trajectories(model, trajectories):
    with pytest.raises(UsageError, match="trajectories"):
        get_method("eda-dm").quantize(model, "W4A8", trajectories, overrides={"n_samples": 1000})


# ---- end to end (every method on the tiny UNet: tests/test_contract.py) -----------------------------------------
def test_ptq4dm_official_scripts_skip_reconstruction(model, trajectories):
    res = get_method("ptq4dm").quantize(model, "W8A8", trajectories, overrides=tiny("ptq4dm", official_scripts=True),
                                        progress=False)
    assert res.info["recon"] == []


def test_ptq4dm_qdrop_reconstruction_is_layer_wise(model, trajectories):
    """QDrop's recon_model finds no special blocks in a diffusion UNet: every Conv/Linear is its own unit."""
    from eda.wrap import quant_layers

    res = get_method("ptq4dm").quantize(model, "W4A8", trajectories, overrides=tiny("ptq4dm", official_scripts=False),
                                        progress=False)
    (stage,) = res.info["recon"]
    assert {r["kind"] for r in stage["units"].values()} == {"layer"}
    assert set(stage["units"]) == set(quant_layers(res.unet))
    assert stage["config"]["lr_schedule"] == "cosine_acts" and stage["config"]["adaround_reg"] == 0.01


def test_quantize_is_seeded(model, trajectories):
    m = get_method("eda-dm")
    kw = tiny("eda-dm", iters=1, w_init="minmax", a_init="minmax")
    a = m.quantize(model, "W4A8", trajectories, seed=1, overrides=kw, progress=False)
    b = m.quantize(model, "W4A8", trajectories, seed=1, overrides=kw, progress=False)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 100, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(a.unet(x, t).sample, b.unet(x, t).sample)
    assert a.info["allocation"] == b.info["allocation"]


def test_qdiffusion_learning_rate_schedules_follow_the_official_code():
    # BRECQ/Q-Diffusion AdaRound weight stage: Adam at 1e-3 with no scheduler; activation stage: cosine to 0.
    from eda.recon import ReconConfig
    from eda.registry import get_method

    w, a = get_method("qdiffusion").configure(bits="W4A8").stages("W4A8", seed=0)
    assert (w.config.lr_schedule, w.config.lr_w) == ("constant", 1e-3)
    assert (a.config.lr_schedule, a.config.lr_a) == ("cosine", 4e-4)
    with pytest.raises(UsageError, match="lr_schedule"):
        ReconConfig(lr_schedule="step")


def test_guided_models_calibrate_on_both_guidance_branches(monkeypatch):
    """EDA-DM (qdiff_control/data_utils.py) and Q-Diffusion (get_train_samples) calibrate every sample with the
    unconditional and the conditional context; the UNet must see both while the method calibrates."""
    from diffusers import UNet2DConditionModel

    from eda.guidance import pair_calibration
    from eda.trajectories import record_trajectories

    model = make_tiny_model(cond=True, steps=4)
    base = model.conditioning

    def guided(n, seed):
        c = base(n, seed)
        return {**c, "uncond_encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"])}

    model = replace(model, conditioning=guided, guidance_scale=3.0)
    traj = record_trajectories(model, 8, seed=1, batch_size=8)
    seen = []
    real = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states=None, **kw):
        seen.append(encoder_hidden_states.detach().flatten(1).abs().sum(1))
        return real(self, sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    res = get_method("rtn").quantize(model, "W8A8", traj, overrides={"n_samples": 8, "init_batch": 8}, progress=False)
    ctx = torch.cat(seen)
    assert (ctx == 0).sum() == (ctx > 0).sum() > 0  # as many unconditional as conditional contexts
    assert res.info["calib_size"] == 16
    xs, ts, cond = pair_calibration(torch.arange(3.0)[:, None], torch.arange(3), {"c": torch.ones(3, 1),
                                                                                 "uncond_c": torch.zeros(3, 1)})
    assert xs.flatten().tolist() == [0, 0, 1, 1, 2, 2] and cond["c"].flatten().tolist() == [0, 1] * 3
    assert set(cond) == {"c"}


def test_stable_diffusion_softmax_bits_per_method():
    """EDA-DM's for_coco.sh: --sm_abit 8; Q-Diffusion's txt2img command: --sm_abit 16, no --a_sym."""
    import types

    from bench.models.zoo import ZOO

    sd = types.SimpleNamespace(defaults=ZOO["sd-v1-4"].defaults)
    assert get_method("eda-dm").configure(sd, "W4A8").softmax_bits == 8
    q = get_method("qdiffusion").configure(sd, "W4A8")
    assert (q.softmax_bits, q.a_symmetric, q.split_shortcut, q.cali_st, q.cali_n) == (16, False, True, 25, 128)
    assert get_method("qdiffusion").configure(types.SimpleNamespace(defaults=ZOO["lsun-bedroom-ldm4"].defaults),
                                              "W4A8").split_shortcut is False
