"""The method contract: every method the registry knows runs end to end on the tiny UNet at a tiny budget.

What the harness relies on, for any registered method (a new one included, with no test of its own): it says what to
record (`calibration_request`), one recording covering every method serves it, and `quantize` returns a UNet of the
same class with quantized layers swapped in (FP: the model's own UNet), finite outputs of the FP shape, the info keys
the result row reads, and the FP model untouched.
"""

import pytest
import torch

from eda.registry import BUILTIN_MODULES, available_methods, get_method
from tests.conftest import make_tiny_model, tiny

torch.set_num_threads(2)


def registered_methods() -> list[str]:
    """The methods of eda.registry and its built-in modules (test plugins that other test modules register, such as
    tests/harness_plugin.py's crashing methods, are not methods)."""
    return [n for n in available_methods() if type(get_method(n)).__module__ in ("eda.registry", *BUILTIN_MODULES)]


METHODS = registered_methods()


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(steps=6, width=8)


@pytest.fixture(scope="module")
def trajectories(model):
    """One recording for all methods, as the harness makes it (bench.harness.cell.calibration_union)."""
    from eda.trajectories import record_trajectories

    requests = [get_method(n).calibration_request(model, tiny(n)) for n in METHODS]
    n = max(k for k, _ in requests)
    features = sorted({f for _, feats in requests for f in feats})
    return record_trajectories(model, n, seed=123, feature_modules=features, batch_size=n)


def test_the_builtin_methods_are_all_covered():
    assert {"fp", "rtn", "ptq4dm", "qdiffusion", "eda-dm", "eda-dm:tdac-only", "eda-dm:fbr-only"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_quantizes_the_tiny_unet(name, model, trajectories):
    from eda.wrap import get_quant_state, quant_layers

    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    res = get_method(name).quantize(model, "W4A8", trajectories, seed=0, overrides=tiny(name), progress=False)
    info = res.info
    assert {"calib_size", "allocation", "quant_seconds", "config"} <= set(info)
    assert type(res.unet) is type(model.unet)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 500, dtype=torch.long)
    with torch.no_grad():
        out = res.unet(x, t).sample
        ref = model.unet(x, t).sample
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if name == "fp":
        assert res.unet is model.unet and info["calib_size"] == 0
        return
    assert len(quant_layers(res.unet)) > 0 and get_quant_state(res.unet) == (True, True)
    assert not torch.equal(out, ref)  # 4-bit weights change the output
    assert info["calib_size"] > 0
    assert len(quant_layers(model.unet)) == 0  # the FP model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
