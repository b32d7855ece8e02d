"""Shared FP artifacts of a model, computed once and reused by every method, bit width and cell.

FP calibration trajectories and FP reference samples depend only on (model weights, sampler, seed, size), never on
the method, so they are cached under a content hash: `$EDA_BENCH_CACHE/harness/` when set, else `<storage>/cache/`
(`bench.run --storage URI`, default `--out`). A resumed or parallel run (another actor, process or node) finds them
there; a lock (bench.harness.storage: an O_EXCL lock file on a path, NFS included, or a lease object on an object
store; never flock) makes concurrent actors wait for the first one instead of computing the same artifact twice.
On an object store each node works from a local mirror (under the system temp folder): an artifact is downloaded
once per node, or computed, written locally and uploaded. Dataset reference statistics are cached by bench.metrics
itself (keyed by dataset, split, extractor and resolution).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_FULL_HASH_MAX_NUMEL = 50_000_000  # hash every weight below this; bigger models hash shapes + a slice per tensor


def cache_root(out: str | os.PathLike) -> str:
    """The artifact cache's path or URI: $EDA_BENCH_CACHE/harness, else `out`/cache (`out` a path or a storage URI;
    a path is made absolute, so workers on other nodes use the same one, not one under their own cwd)."""
    env = os.environ.get("EDA_BENCH_CACHE")
    if env:
        return str((Path(env) / "harness").absolute())
    text = str(out)
    return text.rstrip("/") + "/cache" if "://" in text else str((Path(text) / "cache").absolute())


def _mirror_dir(uri: str) -> Path:
    """A node's local copy of an object-store cache."""
    import tempfile

    return Path(tempfile.gettempdir()) / "eda-bench-mirror" / hashlib.sha1(uri.encode()).hexdigest()[:16]


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
        from bench.harness.storage import open_storage

        self.uri = str(root)
        self.storage = open_storage(root)
        # where the artifacts are read from: the cache itself on a path, a local mirror of an object store
        self.root = self.storage.local_path() if self.storage.posix else _mirror_dir(self.uri)
        self.remote = None if self.storage.posix else self.storage
        self._mem: dict[str, Any] = {}
        self.hits = {"memory": 0, "disk": 0, "computed": 0}

    def _lock(self, kind: str, key: str):
        return self.storage.lock(self.storage.path(kind, f".{key}.lease"))

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
        remote = None if self.remote is None else self.remote.path(kind, f"{key}.pt")
        if path.is_file():  # written whole (renamed into place): no lock needed to read it
            obj = _safe_load(path)
            self.hits["disk"] += 1
        elif remote is not None and self.remote.is_file(remote):  # another node computed it
            self.remote.download(remote, path)
            obj = _safe_load(path)
            self.hits["disk"] += 1
        else:
            with self._lock(kind, key):  # a second actor waits here while the first computes
                if remote is not None and self.remote.is_file(remote):
                    self.remote.download(remote, path)
                if path.is_file():
                    obj = _safe_load(path)
                    self.hits["disk"] += 1
                else:
                    obj = compute()
                    tmp = d / f".tmp-{uuid.uuid4().hex}.pt"
                    torch.save(obj, tmp)
                    os.replace(tmp, path)
                    meta = json.dumps({"kind": kind, **spec}, default=str, indent=1)
                    (d / f"{key}.json").write_text(meta)
                    if remote is not None:
                        self.remote.write_bytes(self.remote.path(kind, f"{key}.json"), meta.encode())
                        self.remote.upload(path, remote)  # last: its presence means the artifact is complete
                    self.hits["computed"] += 1
        self._mem = {key: obj, **{k: v for k, v in list(self._mem.items())[-7:]}}  # keep a few in memory
        return obj

    def directory(self, kind: str, spec: dict, fill: Callable[[Path], None]) -> Path:
        """A folder artifact for `spec` (FP sample shards, read back one batch at a time): `fill(folder)` writes its
        files into a fresh temporary folder, renamed into place (with a `done.json` naming the spec) when it returns,
        so a reader never sees half of one. A second actor waits on the lock, as for `get`."""
        import shutil

        key = self.key(kind, spec)
        d = self.root / kind
        path = d / key
        if (path / "done.json").is_file():
            self.hits["disk"] += 1
            return path
        d.mkdir(parents=True, exist_ok=True)
        if self._fetch_folder(kind, key, path):
            return path
        with self._lock(kind, key):
            if (path / "done.json").is_file():  # another actor finished it while we waited
                self.hits["disk"] += 1
                return path
            if self._fetch_folder(kind, key, path):  # another node finished it (counts its own hit)
                return path
            if path.exists():  # a folder without done.json: left by a crash before the rename completed
                shutil.rmtree(path)
            tmp = d / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                fill(tmp)
                (tmp / "done.json").write_text(json.dumps({"kind": kind, **spec}, default=str, indent=1))
                if self.remote is not None:  # every file, then done.json: its presence means the folder is whole
                    files = sorted(tmp.iterdir(), key=lambda f: f.name == "done.json")
                    for f in files:
                        self.remote.upload(f, self.remote.path(kind, key, f.name))
                os.replace(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.hits["computed"] += 1
        return path

    def _fetch_folder(self, kind: str, key: str, path: Path) -> bool:
        """Object stores: download a folder artifact another node completed (done.json uploaded) into `path`."""
        if self.remote is None or not self.remote.is_file(self.remote.path(kind, key, "done.json")):
            return False
        import shutil

        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            for f in self.remote.list_files(self.remote.path(kind, key)):
                self.remote.download(f, tmp / f.rsplit("/", 1)[1])
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.hits["disk"] += 1
        return True
