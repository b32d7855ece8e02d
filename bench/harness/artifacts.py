"""Shared FP artifacts of a model, computed once and reused by every method, bit width and cell.

FP calibration trajectories and FP reference samples depend only on (model weights, sampler, seed, size), never on
the method, so they are cached on disk under a content hash: `$EDA_BENCH_CACHE/harness/` when set, else
`<out>/cache/`. A resumed or parallel run (another actor, another process) finds them there; a file lock makes
concurrent actors wait for the first one instead of computing the same artifact twice. Dataset reference statistics
are cached by bench.metrics itself (keyed by dataset, split, extractor and resolution).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_FULL_HASH_MAX_NUMEL = 50_000_000  # hash every weight below this; bigger models hash shapes + a slice per tensor


def cache_root(out: str | os.PathLike) -> Path:
    env = os.environ.get("EDA_BENCH_CACHE")
    return Path(env) / "harness" if env else Path(out) / "cache"


def model_fingerprint(model) -> str:
    """Content hash of a DiffusionModel's FP UNet weights and schedule (so retrained weights never hit stale data)."""
    h = hashlib.sha1()
    h.update(json.dumps([model.name, list(model.sample_shape), model.dataset]).encode())
    h.update(model.alphas_cumprod.double().cpu().numpy().tobytes())
    params = list(model.unet.state_dict().items())
    full = sum(p.numel() for _, p in params) <= _FULL_HASH_MAX_NUMEL
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        h.update((flat if full else flat[:4096]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _safe_globals() -> list:
    """The classes a cached artifact may hold besides tensors and plain data: trajectories (their sampler is a plain
    dict), and the numpy arrays/memmaps of trajectories spilled to disk. Nothing else is unpickled.

    torch's weights_only unpickler matches each class by its module path and name as pickled, so this list follows
    the classes where they live now (eda.trajectories). A cache file written before a class moved or left the list
    (e.g. one holding bench.sampling.SamplerConfig, from before trajectories kept their sampler as a dict) is
    refused by `_safe_load` with its one-line message; delete it and it is recomputed."""
    import numpy as np

    from eda.trajectories import CalibSet, Trajectories

    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return [Trajectories, CalibSet, np.ndarray, np.memmap, np.dtype, *dtypes, core.multiarray._reconstruct]


def _safe_load(path: Path) -> Any:
    """torch.load with weights_only=True: a shared $EDA_BENCH_CACHE may be written by someone else,
    so never an unrestricted pickle; only the allowlisted artifact classes are rebuilt."""
    import pickle

    from bench.errors import BenchError

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise BenchError(f"cached artifact {path} holds objects outside the allowed artifact types "
                         f"({str(e).splitlines()[-1][:120]}); delete it and it is recomputed") from None


class ArtifactCache:
    """get(kind, spec, compute): the artifact for `spec` from memory, else disk, else `compute()` (then stored)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._mem: dict[str, Any] = {}
        self.hits = {"memory": 0, "disk": 0, "computed": 0}

    def key(self, kind: str, spec: dict) -> str:
        return hashlib.sha1(json.dumps([kind, spec], sort_keys=True, default=str).encode()).hexdigest()[:20]

    def get(self, kind: str, spec: dict, compute: Callable[[], Any]) -> Any:
        key = self.key(kind, spec)
        if key in self._mem:
            self.hits["memory"] += 1
            return self._mem[key]
        d = self.root / kind
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{key}.pt"
        with open(d / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second actor waits here while the first computes
            try:
                if path.is_file():
                    obj = _safe_load(path)
                    self.hits["disk"] += 1
                else:
                    obj = compute()
                    tmp = d / f".tmp-{uuid.uuid4().hex}.pt"
                    torch.save(obj, tmp)
                    os.replace(tmp, path)
                    (d / f"{key}.json").write_text(json.dumps({"kind": kind, **spec}, default=str, indent=1))
                    self.hits["computed"] += 1
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._mem = {key: obj, **{k: v for k, v in list(self._mem.items())[-7:]}}  # keep a few in memory
        return obj

    def directory(self, kind: str, spec: dict, fill: Callable[[Path], None]) -> Path:
        """A folder artifact for `spec` (FP sample shards, read back one batch at a time): `fill(folder)` writes its
        files into a fresh temporary folder, renamed into place (with a `done.json` naming the spec) when it returns,
        so a reader never sees half of one. A second actor waits on the lock, as for `get`."""
        key = self.key(kind, spec)
        d = self.root / kind
        path = d / key
        if (path / "done.json").is_file():
            self.hits["disk"] += 1
            return path
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if (path / "done.json").is_file():
                    self.hits["disk"] += 1
                    return path
                import shutil

                if path.exists():  # a folder without done.json: left by a crash before the rename completed
                    shutil.rmtree(path)
                tmp = d / f".tmp-{uuid.uuid4().hex}"
                tmp.mkdir()
                try:
                    fill(tmp)
                    (tmp / "done.json").write_text(json.dumps({"kind": kind, **spec}, default=str, indent=1))
                    os.replace(tmp, path)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                self.hits["computed"] += 1
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return path
