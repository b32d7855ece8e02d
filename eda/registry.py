"""Method registry: a PTQ method is data (a frozen dataclass of knobs) registered under a name.

A method = a calibration-set selector (`select`) + a reconstruction recipe (`stages`: loss, iterations, learning
rates, which quantizers learn) + a quantization policy (`policy`). The harness and the CLIs only call
`get_method(name)`; built-in method modules are imported lazily on the first lookup (`BUILTIN_MODULES`), so a new
method is one file plus one line in that tuple.

Knob resolution, lowest to highest priority:
1. the dataclass defaults (the official scripts' CIFAR-10 settings; the digits model uses them too),
2. per-bit-width tables inside the method (e.g. EDA-DM's lr_w / lr_a) for knobs left at None,
3. `model.defaults` (filled by the model zoo for the paper's models):
   - a flat entry `{"radius": 0.3}` applies to every method that has that knob,
   - a dict under the method's family (`"eda-dm"` also covers `eda-dm:tdac-only`) or its exact name applies to it,
   - inside such a dict, a dict under a bit-width string (`"W4A8": {"lr_w": 1e-2}`) applies at that width only,
4. `overrides` (command line `--set key=value`, a config file, a grid row). Unknown keys -> UsageError.

`iters_scale` (every method) multiplies every iteration budget (rounded, at least 1): the official budgets take
GPU-hours, so CPU runs of the digits model use e.g. iters_scale=0.02. Record it with the results.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from eda.errors import UsageError

if typing.TYPE_CHECKING:
    from eda.journal import Journal

# Modules that register the built-in methods, imported on the first registry lookup (one line per method file).
BUILTIN_MODULES = ("eda.method", "baselines.rtn", "baselines.qdiffusion", "baselines.ptq4dm")

_REGISTRY: dict[str, Method] = {}
_LOADED = False


@dataclass
class QuantResult:
    """A quantized UNet (same diffusers class, QuantLayers swapped in) and what happened while making it.
    info has at least: calib_size, allocation (per-step counts or None), quant_seconds, config (resolved knobs)."""

    unet: torch.nn.Module
    info: dict[str, Any]


@dataclass(frozen=True)
class Method:
    """Base of every method. Subclasses add knobs as fields and implement `quantize` (PTQMethod: `select`, `stages`)."""

    name: str = field(default="", compare=False)
    iters_scale: float = 1.0  # multiplies every iteration budget (CPU runs); 1.0 = the official budget

    # ---- knobs -------------------------------------------------------------------------------------------------
    @classmethod
    def knob_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "name"]

    def knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.knob_names()}

    @property
    def family(self) -> str:
        return self.name.split(":")[0]

    def configure(self, model=None, bits: str | None = None, overrides: dict | None = None) -> Method:
        """This method with model defaults, bit-width tables and overrides resolved (see the module docstring)."""
        values: dict[str, Any] = {}
        names = set(self.knob_names())
        if model is not None and getattr(model, "defaults", None):
            values.update(self._model_defaults(model.defaults, names, bits))
        overrides = dict(overrides or {})
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise UsageError(f"unknown knob(s) {', '.join(map(repr, unknown))} for method {self.name!r}; valid: "
                             f"{', '.join(sorted(names))}")
        values.update(overrides)
        hints = typing.get_type_hints(type(self))
        coerced = {k: coerce_value(k, v, hints[k]) for k, v in values.items()}
        m = dataclasses.replace(self, **coerced)
        if bits is not None:
            m = m.resolve_bits(bits)
        m.validate()
        return m

    def _model_defaults(self, defaults: dict, names: set[str], bits: str | None) -> dict[str, Any]:
        out = {k: v for k, v in defaults.items() if k in names and not isinstance(v, dict)}
        for key in dict.fromkeys((self.family, self.name)):
            block = defaults.get(key)
            if not isinstance(block, dict):
                continue
            for k, v in block.items():
                if isinstance(v, dict):
                    if bits is not None and k.upper() == bits.upper():
                        out.update(v)
                elif k in names:
                    out[k] = v
                else:
                    raise UsageError(f"model defaults for {key!r} set unknown knob {k!r}; valid: "
                                     f"{', '.join(sorted(names))}")
        return {k: v for k, v in out.items() if k in names}

    def resolve_bits(self, bits: str) -> Method:
        """Fill knobs that depend on the bit width (None = take the method's table). Default: nothing to do."""
        return self

    def validate(self) -> None:
        if not self.iters_scale > 0:
            raise UsageError(f"iters_scale must be > 0, got {self.iters_scale}")

    def scaled(self, iters: int) -> int:
        """An iteration budget times iters_scale (at least 1)."""
        return max(1, round(iters * self.iters_scale))

    # ---- what a method implements ------------------------------------------------------------------------------
    def calibration_request(self, model, overrides: dict | None = None) -> tuple[int, tuple[str, ...]]:
        """(trajectories to record, modules whose inputs to hook) so one recording can serve every method."""
        return 0, ()

    def quantize(self, model, bits: str, trajectories, seed: int = 0, overrides: dict | None = None,
                 progress: bool = True, journal: Journal | None = None) -> QuantResult:
        """`journal` (optional to accept): where to journal finished work so an interrupted run resumes
        (eda.journal; PTQMethod passes it to every reconstruction stage)."""
        raise NotImplementedError


@dataclass(frozen=True)
class FullPrecision(Method):
    """`fp`: no quantization; the reference row every method is compared with."""

    def quantize(self, model, bits: str = "W32A32", trajectories=None, seed: int = 0, overrides: dict | None = None,
                 progress: bool = True, journal: Journal | None = None) -> QuantResult:
        m = self.configure(model, None, overrides)
        return QuantResult(model.unet, {"calib_size": 0, "allocation": None, "quant_seconds": 0.0,
                                        "config": m.knobs(), "method": self.name, "bits": "fp"})


@dataclass(frozen=True)
class Stage:
    """One reconstruction pass: a ReconConfig run with weight / activation quantization switched on or off."""

    name: str
    config: Any  # eda.recon.ReconConfig
    weights: bool = True
    acts: bool = True
    # Initialise the activation ranges right before this stage, with the weights as reconstructed so far (Q-Diffusion:
    # after weight reconstruction). No stage asking for it = activation ranges set with the weight ranges (EDA-DM).
    init_acts: bool = False


@dataclass(frozen=True)
class PTQMethod(Method):
    """The shared PTQ pipeline: select calibration -> wrap the UNet with the bit policy -> initialise ranges ->
    reconstruction stages. Subclasses change the defaults below and implement `select` and `stages`."""

    n_samples: int = 1024  # calibration samples (EDA-DM and PTQ4DM: 1024)
    # BitPolicy knobs (eda.policy); defaults = EDA-DM's released setup, subclasses change them.
    first_last_8bit: str = "official"  # "official" | "conv_io" | "none" (eda.policy.BitPolicy)
    split_shortcut: bool = True
    w_symmetric: bool = True
    a_symmetric: bool = True
    w_init: str = "lp"
    a_init: str = "lp"
    softmax_bits: int = 8
    quantize_attention: bool = True
    quantize_output_input: bool = False  # official EDA-DM/PTQ4DM: input of the network's output conv stays FP
    init_batch: int = 256  # batch of the activation range initialisation (CIFAR scripts: 256)
    # "fraction": every reconstruction runs iters_scale x its official iteration count; "converged": up to the
    # official count, each unit stopping once its loss has plateaued (eda.convergence)
    budget: str = "fraction"
    init_samples: int | None = None  # calibration samples (seeded random subset) for range init; None = all

    POLICY_KNOBS = ("first_last_8bit", "split_shortcut", "w_symmetric", "a_symmetric", "w_init", "a_init",
                    "softmax_bits", "quantize_attention", "quantize_output_input")

    def validate(self) -> None:
        super().validate()
        if self.n_samples < 1:
            raise UsageError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.init_batch < 1:
            raise UsageError(f"init_batch must be >= 1, got {self.init_batch}")
        if self.init_samples is not None and self.init_samples < 1:
            raise UsageError(f"init_samples must be >= 1 or none, got {self.init_samples}")
        if self.budget not in ("fraction", "converged"):
            raise UsageError(f"budget must be 'fraction' or 'converged', got {self.budget!r}")

    def budget_iters(self, official: int) -> int:
        """Iterations of a reconstruction whose official count is `official`: scaled by iters_scale under
        budget="fraction", the official count as the cap under budget="converged"."""
        return self.scaled(official) if self.budget == "fraction" else official

    def policy(self, bits: str):
        from eda.policy import BitPolicy

        return BitPolicy.from_bits(bits, **{k: getattr(self, k) for k in self.POLICY_KNOBS})

    def calibration_request(self, model, overrides: dict | None = None) -> tuple[int, tuple[str, ...]]:
        m = self.configure(model, None, overrides)
        return m.n_trajectories(), m.feature_modules(model)

    def n_trajectories(self) -> int:
        return self.n_samples

    def feature_modules(self, model) -> tuple[str, ...]:
        return ()

    def select(self, model, trajectories, seed: int):
        """-> (CalibSet, per-step allocation list or None, extra info dict)."""
        raise NotImplementedError

    def stages(self, bits: str, seed: int) -> list[Stage]:
        """Reconstruction passes in order; [] = ranges only (round-to-nearest)."""
        return []

    def init_subset(self, calib, seed: int):
        """The calibration samples the range initialisation sees: all, or a seeded random `init_samples`."""
        if self.init_samples is None or self.init_samples >= len(calib):
            return calib
        g = torch.Generator().manual_seed(seed + 7919)
        return calib.subset(torch.randperm(len(calib), generator=g)[: self.init_samples])

    def check_trajectories(self, trajectories, need: int) -> None:
        have = trajectories.xs.shape[1]
        if have < need:
            raise UsageError(f"method {self.name!r} needs {need} recorded trajectories but the set has {have}; "
                             f"record more (see calibration_request) or lower n_samples")

    def quantize(self, model, bits: str, trajectories, seed: int = 0, overrides: dict | None = None,
                 progress: bool = True, journal: Journal | None = None) -> QuantResult:
        """Quantize `model`. With a `journal` (eda.journal.Journal), each reconstructed unit is journalled, and a
        rerun after an interruption restores those units and continues from the next; the caller clears the
        journal once the result is safe. quant_seconds then counts restored units at the seconds they took."""
        from eda.recon import reconstruct
        from eda.wrap import init_ranges, quantize_unet, set_quant_state

        m = self.configure(model, bits, overrides)
        t0 = time.perf_counter()
        calib, allocation, extra = m.select(model, trajectories, seed)
        calib = calib.paired_for_guidance()  # guided models: every sample with both CFG branches
        policy = m.policy(bits)
        qunet = quantize_unet(model.unet, policy)
        stages = m.stages(bits, seed)
        late_acts = any(stage.init_acts for stage in stages)
        init_subset = m.init_subset(calib, seed)
        if journal is not None and stages:
            journal.open(_journal_identity(m, bits, seed, stages),
                         {**_calib_tensors("calib", calib), **_calib_tensors("init", init_subset),
                          **{f"fp.{k}": v for k, v in model.unet.state_dict().items()}})
        init_ranges(qunet, init_subset, batch_size=m.init_batch, acts=not late_acts)
        reports = []
        for stage in stages:
            if stage.init_acts:
                init_ranges(qunet, init_subset, batch_size=m.init_batch, weights=False, acts=True)
            set_quant_state(qunet, weights=stage.weights, acts=stage.acts)
            rep = reconstruct(qunet, model.unet, calib, stage.config, progress=progress,
                              journal=None if journal is None else journal.stage(stage.name))
            reports.append({"stage": stage.name, **(rep or {})})
        set_quant_state(qunet, weights=True, acts=True)
        restored = sum(r.get("restored", 0) for r in reports)
        info = {
            "method": self.name, "bits": policy.describe(), "calib_size": int(calib.xs.shape[0]),
            "allocation": allocation, "restored_units": restored,
            "quant_seconds": time.perf_counter() - t0 + sum(r.get("restored_seconds", 0.0) for r in reports),
            "config": m.knobs(),
            "policy": dataclasses.asdict(policy), "recon": [_compact(r) for r in reports],
            "convergence": convergence(reports), "seed": seed, **extra,
        }
        return QuantResult(qunet, info)


def _journal_identity(m: PTQMethod, bits: str, seed: int, stages: list[Stage]) -> dict:
    """What, besides the data and weights, a journalled unit depends on (eda.journal's fingerprint)."""
    return {"method": m.name, "knobs": m.knobs(), "bits": bits, "seed": seed,
            "stages": [dataclasses.asdict(s) for s in stages]}


def _calib_tensors(prefix: str, calib) -> dict:
    out = {f"{prefix}.xs": calib.xs, f"{prefix}.ts": calib.ts}
    for k, v in (calib.cond or {}).items():
        out[f"{prefix}.cond.{k}"] = v
    return out


def _compact(report: dict) -> dict:
    """A stage report for the result row: each unit's loss summary instead of its every-iteration losses."""
    units = {n: {k: v for k, v in r.items() if k != "losses"} for n, r in report.get("units", {}).items()}
    return {**report, "units": units}


def convergence(reports: list[dict]) -> dict:
    """How many reconstructed units (over every stage) ended on a plateau (eda.convergence's rule)."""
    units = [r for rep in reports for r in rep.get("units", {}).values() if r.get("loss", {}).get("iters")]
    bad = sum(not r["loss"]["plateaued"] for r in units)
    return {"units": len(units), "unconverged": bad, "unconverged_fraction": bad / len(units) if units else 0.0}


# ---- registry ------------------------------------------------------------------------------------------------------
def register_method(name: str, **fixed) -> Callable[[type], type]:
    """Class decorator: register `cls(name=name, **fixed)`. Stack it to register ablations of one class."""

    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = cls(name=name, **fixed)
        return cls

    return deco


register_method("fp")(FullPrecision)


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method (with its default knobs); UsageError listing the known names on a miss."""
    _load_builtins()
    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# ---- override parsing ----------------------------------------------------------------------------------------------
def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['iters=100', 'loss=fbr'] -> {'iters': 100, 'loss': 'fbr'}: values parsed as TOML when they parse (so a
    `--set` and the same key in a grid file give the same typed value), else kept as strings; either way they are
    coerced to each knob's type by `configure`."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad --set {item!r}; expected key=value, e.g. --set iters_scale=0.01")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Convert a string (or TOML value) to the knob's annotated type: int, float, bool, str, or X | None."""
    args = typing.get_args(hint)
    options = [a for a in args if a is not type(None)] if args else [hint]
    nullable = type(None) in args
    if isinstance(value, str) and nullable and value.lower() in ("none", "null", ""):
        return None
    if value is None and nullable:
        return None
    for typ in options:
        try:
            return _coerce_one(value, typ)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options) + (" or none" if nullable else "")
    raise UsageError(f"knob {key!r} expects {names}, got {value!r}")


def _coerce_one(value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError
    if typ is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            f = float(value)
            if f.is_integer():
                return int(f)
        raise ValueError
    if typ is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise TypeError(f"unsupported knob type {typ}")


