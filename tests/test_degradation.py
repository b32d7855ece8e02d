"""Silent degradations a method can suffer without crashing, each caught by its behaviour on a tiny model (seconds).

Each test names the plausible bug it guards against: EDA-DM running no reconstruction, FBR reduced to plain block
MSE, TDAC replaced by a uniform allocation, EDA-DM running round-to-nearest or another method's recipe, Q-Diffusion's
activation stage fed quantized inputs or initialised before weight reconstruction, quantizers left in calibration
or QDrop mode during sampling. (Calibration sharing noise with evaluation: tests/test_cell.py.)
"""

import copy

import pytest
import torch

from eda.registry import get_method
from tests.conftest import tiny
from tests.test_methods import tiny_model
from tests.test_tdac import official_allocation

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def trajectories(model):
    from eda.trajectories import mid_attention_name, record_trajectories

    return record_trajectories(model, 16, seed=321, feature_modules=(mid_attention_name(model.unet),), batch_size=16)


@pytest.fixture(scope="module")
def eda(model, trajectories):
    return get_method("eda-dm").quantize(model, "W4A8", trajectories, seed=0,
                                         overrides=tiny("eda-dm", n_samples=16, iters=20), progress=False)


def _eps_error(model, unet, trajectories) -> float:
    """Noise-prediction MSE against FP on every (step, trajectory) of the recorded set."""
    calib = trajectories.all_steps()
    with torch.no_grad():
        fp = model.unet(calib.xs, calib.ts).sample
        q = unet(calib.xs, calib.ts).sample
    return float(((q - fp) ** 2).mean())


def test_eda_dm_reconstructs_every_unit_and_lowers_its_error(eda):
    """Bug: EDA-DM silently skips reconstruction (or runs zero iterations)."""
    (stage,) = eda.info["recon"]
    units = stage["units"]
    assert len(units) >= 10 and all(r["loss"]["iters"] == 20 for r in units.values())
    lowered = [r["mse_after"] < r["mse_before"] for r in units.values()]
    assert sum(lowered) >= 0.8 * len(lowered), units  # a few layer units may already be at their optimum


def test_eda_dm_beats_its_own_round_to_nearest(model, trajectories, eda):
    """Bug: EDA-DM returns the range-initialised (round-to-nearest) model, or another recipe's weaker result."""
    rtn_same_policy = get_method("eda-dm").quantize(model, "W4A8", trajectories, seed=0,
                                                    overrides=tiny("eda-dm", n_samples=16, iters=1, lr_w=0.0, lr_a=0.0),
                                                    progress=False)
    assert _eps_error(model, eda.unet, trajectories) < 0.9 * _eps_error(model, rtn_same_policy.unet, trajectories)
    assert _eps_error(model, eda.unet, trajectories) < _eps_error(
        model, get_method("rtn").quantize(model, "W4A8", trajectories, overrides=tiny("rtn", n_samples=16),
                                          progress=False).unet, trajectories)


def test_eda_dm_runs_fbr_layer_terms_and_its_own_recipe(eda):
    """Bug: FBR reduced to plain block MSE (EDA-DM = its TDAC-only ablation), or EDA-DM running Q-Diffusion's or
    PTQ4DM's recipe (AdaRound regulariser, other learning rates)."""
    units = eda.info["recon"][0]["units"]
    blocks = {n: r for n, r in units.items() if r["kind"] in ("resnet", "attention")}
    assert blocks and all(r["layer_terms"] and r["terms_first"]["layers"] > 0 for r in blocks.values())
    cfg = eda.info["recon"][0]["config"]
    assert (cfg["loss"], cfg["gamma"], cfg["adaround_reg"], cfg["lr_w"], cfg["lr_a"]) == ("fbr", 0.8, None, 0.5, 5e-4)
    assert (cfg["qdrop_prob"], cfg["input_prob"], cfg["asym"]) == (0.5, 0.5, True)


def test_tdac_allocation_is_tdac_not_uniform(model, trajectories, eda):
    """Bug: TDAC replaced by a uniform allocation (EDA-DM = its FBR-only ablation)."""
    from eda.trajectories import mid_attention_name

    feats = trajectories.features[mid_attention_name(model.unet)]
    expect = official_allocation(list(feats), 16, lam=1.2, radius=3.0).tolist()
    assert eda.info["allocation"] == expect
    uniform = get_method("eda-dm:fbr-only").quantize(model, "W4A8", trajectories, overrides=tiny(
        "eda-dm", n_samples=16, iters=1), progress=False).info["allocation"]
    assert expect != uniform


def _two_unit_setup(model, trajectories, corrupt: bool):
    """A W4A8 model with ranges set; optionally its first unit's weights wrecked (a huge weight step size)."""
    from eda.policy import BitPolicy
    from eda.units import reconstruction_units
    from eda.wrap import init_ranges, quant_layers, quantize_unet

    q = quantize_unet(model.unet, BitPolicy.from_bits("W4A8", w_init="minmax", a_init="minmax"))
    calib = trajectories.all_steps().subset(torch.arange(0, 32))
    init_ranges(q, calib, batch_size=32)
    units = reconstruction_units(q)
    if corrupt:
        first = next(iter(quant_layers(q).values()))
        with torch.no_grad():
            first.weight_quantizer.delta.mul_(50)
    return q, calib, units


@pytest.mark.parametrize("asym", [False, True])
def test_activation_stage_without_asym_reconstructs_from_fp_inputs(model, trajectories, asym):
    """Bug: Q-Diffusion's activation stage (asym=False) fed the quantized model's inputs. Without asym, wrecking an
    upstream layer must not change what a downstream unit learns; with asym it must."""
    from eda.recon import ReconConfig, reconstruct
    from eda.wrap import set_quant_state

    learned = []
    for corrupt in (False, True):
        q, calib, units = _two_unit_setup(model, trajectories, corrupt)
        target = units[4].name  # a block well downstream of the wrecked first layer
        set_quant_state(q, True, True)
        cfg = ReconConfig(iters=3, batch_size=8, loss="lp", p=2.4, lr_a=1e-2, learn_weights=False,
                          qdrop_prob=0.0, input_prob=1.0, asym=asym, only=(target,), seed=0)
        reconstruct(q, model.unet, calib, cfg, progress=False)
        learned.append(torch.cat([p.detach().flatten() for n, p in q.get_submodule(target).named_parameters()
                                  if n.endswith("delta")]))
    assert torch.equal(learned[0], learned[1]) != asym


def test_qdiffusion_sets_activation_ranges_after_weight_reconstruction(model, trajectories):
    """Bug: Q-Diffusion's activation ranges initialised before weight reconstruction (the official order is after).
    With the activation stage frozen (lr 0), the final ranges must be those of the reconstructed weights."""
    from eda.wrap import act_quantizers, init_ranges

    res = get_method("qdiffusion").quantize(model, "W4A8", trajectories, seed=0,
                                            overrides=tiny("qdiffusion", iters=30, lr_a=0.0), progress=False)
    final = {n: q.delta.detach().clone() for n, q in act_quantizers(res.unet).items()}
    m = get_method("qdiffusion").configure(model, "W4A8", tiny("qdiffusion", iters=30))
    calib, _, _ = m.select(model, trajectories, 0)
    redo = copy.deepcopy(res.unet)
    init_ranges(redo, m.init_subset(calib, 0), batch_size=m.init_batch, weights=False, acts=True)
    assert all(torch.equal(final[n], q.delta) for n, q in act_quantizers(redo).items())
    # and those differ from ranges set on the round-to-nearest weights (so the test can tell the orders apart)
    rtn_order = get_method("qdiffusion").quantize(model, "W4A8", trajectories, seed=0, overrides=tiny(
        "qdiffusion", iters=1, lr_w=0.0, lr_a=0.0), progress=False)
    before = {n: q.delta for n, q in act_quantizers(rtn_order.unet).items()}
    assert any(not torch.equal(final[n], before[n]) for n in final)


@pytest.mark.parametrize("name", ["eda-dm", "qdiffusion", "ptq4dm", "rtn"])
def test_no_quantizer_left_calibrating_or_dropping(name, model, trajectories):
    """Bug: a quantizer left in calibration (range-updating) or QDrop mode during sampling: sampling would move the
    ranges or mix in FP values at random, so two sampling runs from one seed would differ."""
    from eda.wrap import act_quantizers

    res = get_method(name).quantize(model, "W4A8", trajectories, seed=0, overrides=tiny(name), progress=False)
    qs = act_quantizers(res.unet)
    before = {n: q.delta.detach().clone() for n, q in qs.items()}
    a = model.generate(4, seed=5, unet=res.unet, batch_size=4)
    b = model.generate(4, seed=5, unet=res.unet, batch_size=4)
    assert torch.equal(a, b)
    assert all(torch.equal(before[n], q.delta) for n, q in qs.items())
    assert not any(q.calibrating or q.training_qdrop or q.delta.requires_grad for q in qs.values())
