"""Test plugin for the harness (`--import tests.harness_plugin`): a tiny random UNet model and fake methods.

Imported in the driver and in every Ray worker, so it must not depend on pytest fixtures.
  test-tiny   a 1x8x8 UNet2DModel with seeded random weights, DDIM 4 steps (seconds per cell on CPU)
  test-picky  test-tiny, unavailable wherever the environment variable TEST_PICKY_MISSING is set
  test-ok     "quantizes" by adding seeded noise of size `noise` to every weight (bits change the noise)
  test-raise  raises ValueError (a cell that raises is recorded as failed)
  test-crash  kills its worker with os._exit once per `marker` file (then behaves like test-ok)
  test-abort  kills its worker with os._exit every time
  test-eda-crash  EDA-DM whose worker dies after `crash_after` reconstructed units, once per `marker` file
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from bench.models import DiffusionModel, available_models, register_model
from bench.models.sampling import SamplerConfig
from bench.models.schedule import alphas_cumprod_for
from eda.registry import Method, QuantResult, available_methods, register_method
from tests.conftest import make_tiny_unet  # the one tiny test UNet


def _tiny_model() -> DiffusionModel:
    return DiffusionModel(name="test-tiny", unet=make_tiny_unet(width=8), alphas_cumprod=alphas_cumprod_for("linear"),
                          sampler=SamplerConfig(kind="ddim", steps=4, eta=0.0, skip="uniform"),
                          sample_shape=(1, 8, 8), dataset="digits", source="tests.harness_plugin")


if "test-tiny" not in available_models():
    register_model("test-tiny")(_tiny_model)


def _picky_available() -> tuple[bool, str]:
    """A model whose weights some machines lack: missing wherever TEST_PICKY_MISSING is set (a test cluster sets
    it on one node's raylet)."""
    if os.environ.get("TEST_PICKY_MISSING"):
        return False, "weights missing on this node (TEST_PICKY_MISSING)"
    return True, "weights here"


if "test-picky" not in available_models():

    @register_model("test-picky", available=_picky_available)
    def _picky() -> DiffusionModel:
        model = _tiny_model()
        model.name = "test-picky"
        return model


@dataclass(frozen=True)
class _Fake(Method):
    noise: float = 0.01
    n_traj: int = 4
    marker: str = ""

    def calibration_request(self, model, overrides=None):
        m = self.configure(model, None, overrides)
        return m.n_traj, ()

    def quantize(self, model, bits, trajectories, seed=0, overrides=None, progress=True):
        m = self.configure(model, bits, overrides)
        self.misbehave(m)
        w = int(bits[1:bits.index("A")])
        g = torch.Generator().manual_seed(seed)
        unet = copy.deepcopy(model.unet)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * m.noise * 8 / w)
        return QuantResult(unet, {"calib_size": int(trajectories.xs.shape[1]), "allocation": [1] * 4,
                                  "quant_seconds": 0.01, "config": m.knobs()})

    def misbehave(self, m):
        pass


if "test-ok" not in available_methods():

    @register_method("test-ok")
    @dataclass(frozen=True)
    class _Ok(_Fake):
        pass

    @register_method("test-raise")
    @dataclass(frozen=True)
    class _Raise(_Fake):
        def misbehave(self, m):
            raise ValueError("planted failure in test-raise")

    @register_method("test-crash")
    @dataclass(frozen=True)
    class _Crash(_Fake):
        def misbehave(self, m):
            if m.marker and not os.path.exists(m.marker):
                open(m.marker, "w").close()
                os._exit(1)  # a hard crash of the worker process, as a segfault or an OOM kill would be

    @register_method("test-abort")
    @dataclass(frozen=True)
    class _Abort(_Fake):
        def misbehave(self, m):
            os._exit(1)


if "test-slow" not in available_methods():

    @register_method("test-slow")
    @dataclass(frozen=True)
    class _Slow(_Fake):
        """Like test-ok, after `sleep` seconds in quantize: a cell that is still running a while after it began."""
        sleep: float = 0.0

        def misbehave(self, m):
            import time

            time.sleep(m.sleep)


if "test-signal" not in available_methods():

    @register_method("test-signal")
    @dataclass(frozen=True)
    class _Signal(_Fake):
        """Like test-ok, but quantize waits (at most `sleep` seconds) for the file `until` to exist; its row's info
        says whether it appeared. A test's driver creates the file when it receives the cell's first live log line,
        so the row tells, whatever the machine's load, whether lines reach the driver while the cell still runs."""
        sleep: float = 120.0
        until: str = ""

        def quantize(self, model, bits, trajectories, seed=0, overrides=None, progress=True):
            import time

            m = self.configure(model, bits, overrides)
            end = time.monotonic() + m.sleep
            while m.until and not os.path.exists(m.until) and time.monotonic() < end:
                time.sleep(0.1)
            res = super().quantize(model, bits, trajectories, seed, overrides, progress)
            res.info.update(saw_driver_signal=bool(m.until) and os.path.exists(m.until))
            return res


if "test-where" not in available_methods():

    @register_method("test-where")
    @dataclass(frozen=True)
    class _Where(_Fake):
        """Like test-ok; its row's info says where the worker imported bench and eda from, and EDA_BENCH_PROBE."""

        def quantize(self, model, bits, trajectories, seed=0, overrides=None, progress=True):
            import bench
            import eda

            res = super().quantize(model, bits, trajectories, seed, overrides, progress)
            res.info.update(code=[bench.__file__, eda.__file__], probe=os.environ.get("EDA_BENCH_PROBE"))
            return res


if "test-eda-crash" not in available_methods():
    from eda.method import EDADM

    @register_method("test-eda-crash")
    @dataclass(frozen=True)
    class _EdaCrash(EDADM):
        """EDA-DM whose worker process dies (os._exit) after `crash_after` reconstructed units, once per `marker`
        file: a worker killed mid-reconstruction, whose retried cell resumes from the journal (eda/journal.py)."""

        marker: str = ""
        crash_after: int = 2

        def quantize(self, model, bits, trajectories, seed=0, overrides=None, progress=True, journal=None):
            import eda.recon as recon

            m = self.configure(model, bits, overrides)
            real, done = recon._reconstruct_unit, []

            def dying(*args, **kwargs):
                if m.marker and not os.path.exists(m.marker) and len(done) == m.crash_after:
                    open(m.marker, "w").close()
                    os._exit(1)
                done.append(1)
                return real(*args, **kwargs)

            recon._reconstruct_unit = dying
            try:
                return super().quantize(model, bits, trajectories, seed, overrides, progress, journal)
            finally:
                recon._reconstruct_unit = real
