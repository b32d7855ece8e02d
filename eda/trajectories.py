"""Calibration data: full-precision sampling trajectories and the calibration sets drawn from them.

`record_trajectories` runs the same sampler that evaluation uses (the model's `generate`, bench's sampling loop)
with hooks and records, per step, the x_t fed to the UNet, t, the per-sample conditioning and the input (or output)
of any named module (TDAC needs the input of the middle attention at every step, `scripts/calibration.py`). Everything stays on
CPU (optionally float16) and is spilled to numpy memmaps on disk above `max_bytes`, so one recording serves every
method and bit width. `CalibSet` is what range init and reconstruction consume.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eda.errors import BenchError, UsageError
from eda.hooks import StepRecord

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB in RAM, then memmaps


@dataclass
class CalibSet:
    """UNet inputs for calibration: xs [M, ...], ts [M] (long), cond dict name -> [M, ...] or None."""

    xs: torch.Tensor
    ts: torch.Tensor
    cond: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        if len(self.xs) != len(self.ts):
            raise ValueError(f"CalibSet: {len(self.xs)} inputs but {len(self.ts)} time steps")

    def __len__(self) -> int:
        return len(self.xs)

    def subset(self, idx) -> CalibSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        cond = None if self.cond is None else {k: v[idx] for k, v in self.cond.items()}
        return CalibSet(self.xs[idx], self.ts[idx], cond)

    def paired_for_guidance(self) -> CalibSet:
        """Each sample as an (uncond, cond) pair when the conditioning carries `uncond_*` keys (guided models),
        else self: guided models calibrate on both branches (eda/guidance.py)."""
        from eda.guidance import pair_calibration

        xs, ts, cond = pair_calibration(self.xs, self.ts, self.cond)
        return self if xs is self.xs else CalibSet(xs, ts, cond)

    def batches(self, batch_size: int, device: str | torch.device | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]]:
        """(x float32, t, cond) batches in order, moved to `device` if given."""
        for s in range(0, len(self), batch_size):
            x = self.xs[s:s + batch_size].float()
            t = self.ts[s:s + batch_size]
            c = None if self.cond is None else {k: v[s:s + batch_size] for k, v in self.cond.items()}
            if device is not None:
                x, t = x.to(device), t.to(device)
                c = None if c is None else {k: v.to(device) for k, v in c.items()}
            yield x, t, c


@dataclass
class Trajectories:
    """xs [S, N, *shape] (x_t at each of the S steps, noisiest first), ts [S], cond [N, ...] or None,
    features name -> [S, N, ...]."""

    xs: torch.Tensor
    ts: torch.Tensor
    cond: dict[str, torch.Tensor] | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    sampler: dict | None = None  # the sampler's settings as plain data (kind, steps, eta, ...): metadata only
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.xs.shape[0]

    @property
    def n(self) -> int:
        return self.xs.shape[1]

    def select(self, step_of_sample: torch.Tensor) -> CalibSet:
        """Sample i from trajectory i at step step_of_sample[i]; -1 leaves trajectory i unused."""
        step_of_sample = torch.as_tensor(step_of_sample, dtype=torch.long)
        if step_of_sample.shape != (self.n,):
            raise UsageError(f"select expects one step per trajectory ({self.n}), got shape "
                             f"{tuple(step_of_sample.shape)}")
        samples = torch.nonzero(step_of_sample >= 0).flatten()
        return self.select_pairs(step_of_sample[samples], samples)

    def select_pairs(self, steps, samples) -> CalibSet:
        """CalibSet of (step, sample) pairs, in the given order."""
        steps = torch.as_tensor(steps, dtype=torch.long).flatten()
        samples = torch.as_tensor(samples, dtype=torch.long).flatten()
        if len(steps) != len(samples):
            raise UsageError(f"select_pairs: {len(steps)} steps but {len(samples)} samples")
        if len(steps) and (steps.min() < 0 or steps.max() >= self.steps or samples.min() < 0
                           or samples.max() >= self.n):
            raise UsageError(f"select_pairs: indices outside {self.steps} steps x {self.n} trajectories")
        xs = torch.stack([torch.as_tensor(self.xs[s, i]) for s, i in zip(steps.tolist(), samples.tolist())]) \
            if len(steps) else self.xs[:0, 0]
        cond = None if self.cond is None else {k: v[samples] for k, v in self.cond.items()}
        return CalibSet(xs.float(), self.ts[steps].clone(), cond)

    def all_steps(self) -> CalibSet:
        """Every (step, sample) pair, step-major."""
        s = torch.arange(self.steps).repeat_interleave(self.n)
        i = torch.arange(self.n).repeat(self.steps)
        return self.select_pairs(s, i)

    def save(self, directory: str | Path):
        """safetensors + JSON (no pickle); memmapped arrays are copied."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"xs": self.xs.contiguous(), "ts": self.ts}
        tensors.update({f"cond.{k}": v.contiguous() for k, v in (self.cond or {}).items()})
        tensors.update({f"feature.{k}": v.contiguous() for k, v in self.features.items()})
        save_file({k: torch.as_tensor(v).clone() for k, v in tensors.items()}, str(d / "trajectories.safetensors"))
        meta = {"seed": self.seed, "sampler": self.sampler}
        (d / "trajectories.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> Trajectories:
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "trajectories.safetensors").is_file():
            raise BenchError(f"no trajectories.safetensors in {d}; record them with record_trajectories first")
        t = load_file(str(d / "trajectories.safetensors"))
        meta = json.loads((d / "trajectories.json").read_text())
        cond = {k[5:]: v for k, v in t.items() if k.startswith("cond.")} or None
        feats = {k[8:]: v for k, v in t.items() if k.startswith("feature.")}
        return cls(t["xs"], t["ts"], cond, feats, meta.get("sampler") or None, meta.get("seed", 0))


def mid_attention_name(unet: nn.Module) -> str:
    """The UNet's middle attention (Attention in UNet2DModel, Transformer2DModel in conditional UNets): TDAC
    hooks its input."""
    mid = getattr(unet, "mid_block", None)
    attns = getattr(mid, "attentions", None) if mid is not None else None
    if not attns:
        raise BenchError(f"{type(unet).__name__} has no mid-block attention; TDAC needs a UNet with attention "
                         "in the middle block (set add_attention=True)")
    return "mid_block.attentions.0"


def _parse_feature(spec: str) -> tuple[str, str]:
    name, _, where = spec.partition("@")
    if where not in ("", "input", "output"):
        raise UsageError(f"feature {spec!r}: expected 'module' or 'module@input' / 'module@output'")
    return name, where or "input"


class _Store:
    """A [S, N, ...] array in RAM, or a numpy memmap once the total would pass max_bytes."""

    def __init__(self, shape, dtype: torch.dtype, spill: Path | None, key: str):
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
        if spill is None:
            self.t = torch.zeros(shape, dtype=dtype)
        else:
            mm = np.lib.format.open_memmap(spill / f"{key}.npy", mode="w+", dtype=np_dtype, shape=tuple(shape))
            self.t = torch.from_numpy(mm)


def _spill_dir(spill_dir) -> Path:
    d = Path(spill_dir) if spill_dir is not None else Path(tempfile.mkdtemp(prefix="eda-traj-"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@torch.no_grad()
def record_trajectories(model, n: int, seed: int, feature_modules=(), batch_size: int = 256,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        spill_dir: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                        progress: bool = False) -> Trajectories:
    """Run the FP sampler for n trajectories from `seed` and record x_t, t, conditioning and the named features.

    model: a bench DiffusionModel, or anything with its interface (name, unet, sampler, sample_shape, conditioning,
    timesteps(), generate(..., hooks=)).

    feature_modules: module names of model.unet; 'name' or 'name@input' records its first input, 'name@output'
    its output (the first element if it returns a tuple).
    """
    if dtype not in (torch.float16, torch.float32):
        raise UsageError(f"trajectory dtype must be float16 or float32, got {dtype}")
    sampler = dict(vars(model.sampler))  # a frozen dataclass of plain values (bench's SamplerConfig), kept as data
    S = len(model.timesteps())  # the steps the model's sampler visits
    shape = (S, n, *model.sample_shape)
    elem = torch.finfo(dtype).bits // 8
    spill: Path | None = None
    if int(np.prod(shape)) * elem > max_bytes:
        spill = _spill_dir(spill_dir)
    xs = _Store(shape, dtype, spill, "xs").t
    ts = torch.zeros(S, dtype=torch.long)
    feats: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.unet.named_modules())
    for spec in feature_modules:
        name, where = _parse_feature(spec)
        if name not in modules:
            raise UsageError(f"feature module {name!r} not found in {type(model.unet).__name__}")

        def hook(mod, args, out, key=spec, where=where):
            v = args[0] if where == "input" else (out[0] if isinstance(out, tuple) else out)
            v = v.sample if hasattr(v, "sample") else v
            pending[key] = v.detach().to("cpu", dtype)

        handles.append(modules[name].register_forward_hook(hook))

    def on_step(rec: StepRecord):
        b = rec.x_t.shape[0]
        # a NaN/inf here would surface later as a "diverged" reconstruction with a misleading hint; name the cause
        if rec.eps is not None and not bool(torch.isfinite(rec.eps).all()):
            raise BenchError(f"the full-precision model {model.name} predicts non-finite noise (NaN/inf) at sampling "
                             f"step {rec.index} (t={int(rec.t)}); its weights hold NaN/inf or overflow: check or "
                             "re-download the checkpoint")
        xs[rec.index, rec.offset:rec.offset + b] = rec.x_t.detach().to("cpu", dtype)
        ts[rec.index] = rec.t
        for key, v in pending.items():
            if key not in feats:
                fshape = (S, n, *v.shape[1:])
                where = spill
                if where is None and int(np.prod(fshape)) * elem > max_bytes:
                    where = _spill_dir(spill_dir)
                feats[key] = _Store(fshape, dtype, where, f"feat{len(feats)}").t
            # classifier-free guidance runs [uncond; cond] batches: keep the conditional half
            feats[key][rec.index, rec.offset:rec.offset + b] = v[-b:]
        pending.clear()

    try:
        model.generate(n, seed=seed, batch_size=batch_size, device=device, hooks=[on_step], progress=progress)
    finally:
        for h in handles:
            h.remove()
    cond = model.conditioning(n, seed) if model.conditioning is not None else None
    cond = None if cond is None else {k: v.detach().cpu() for k, v in cond.items()}
    return Trajectories(xs, ts, cond, feats, sampler, seed)
